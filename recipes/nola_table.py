"""Results table of recipes/nola.mk: perplexity and task accuracy against parameters and bytes."""

import sys
from pathlib import Path

from tables import accuracy, cell, load, markdown, mean_std, pyplot


def arms(budgets: list[str]) -> list[tuple[str, str]]:
    out = [("lora8", "LoRA rank 8"), ("lora1", "LoRA rank 1")]
    out += [(f"nola{b}", f"NOLA trained, k = l = {b}") for b in budgets]
    out += [(f"from8-{b}", f"LoRA r8 -> NOLA, k = l = {b}") for b in budgets]
    return out


def size(adapter: Path) -> tuple[int, int]:
    """(stored parameters, bytes of the weights file) of an adapter."""
    m = load(adapter / "calora.json")
    if (adapter / "nola.safetensors").exists():
        p = m["params"]
        return len(m["params"]["basis_fingerprints"]) * (p["k"] + p["l"]), (adapter / "nola.safetensors").stat().st_size
    return m["metrics"]["trainable_params"], (adapter / "adapter_model.safetensors").stat().st_size


def collect(root: Path, arm: str, seeds: list[str]) -> dict:
    evals = [load(root / f"s{s}" / arm / "eval.json") for s in seeds]
    params, nbytes = size(root / f"s{seeds[0]}" / arm)
    return {"ppl": [e["perplexity"] for e in evals], "acc": [accuracy(e) for e in evals], "params": params, "bytes": nbytes}


def plot(results: dict, budgets: list[str], base_ppl: float, out: Path) -> None:
    plt = pyplot(out)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for prefix, label, marker in (("nola", "NOLA trained", "o"), ("from8-", "LoRA r8 -> NOLA (distilled)", "s")):
        pts = [(results[f"{prefix}{b}"]["params"], *mean_std(results[f"{prefix}{b}"]["ppl"])) for b in budgets]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker, label=label, capsize=3)
    for arm, label, marker in (("lora8", "LoRA r8", "*"), ("lora1", "LoRA r1", "^")):
        m, s = mean_std(results[arm]["ppl"])
        ax.errorbar([results[arm]["params"]], [m], yerr=[s], marker=marker, markersize=10, linestyle="none", label=label, capsize=3)
    ax.axhline(base_ppl, color="grey", linestyle=":", label="base model, no adapter")
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (log)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(root: str, budgets: str, seeds: str, png: str | None = None) -> None:
    root, budgets, seeds = Path(root), budgets.split(), seeds.split()
    results = {arm: collect(root, arm, seeds) for arm, _ in arms(budgets)}
    base = load(root / "eval-base.json")
    if png:
        plot(results, budgets, base["perplexity"], Path(png))
    print(f"Base model, no adapter: perplexity {base['perplexity']:.2f}, task accuracy {accuracy(base):.3f}. "
          f"Seeds {', '.join(seeds)}; mean ± std.\n")
    rows = [(label, [f"{results[a]['params']:,}", f"{results[a]['bytes']:,}", cell(results[a]["ppl"]),
                     cell(results[a]["acc"], "{:.3f}")]) for a, label in arms(budgets)]
    markdown("Perplexity on the held-out text and next-line task accuracy", ["adapter", "stored parameters",
             "bytes on disk", "perplexity", "task accuracy"], rows)


if __name__ == "__main__":
    main(*sys.argv[1:5])

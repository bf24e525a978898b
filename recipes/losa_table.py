"""Results tables of recipes/losa.mk: perplexity, task accuracy and merged sparsity per arm and base."""

import sys
from pathlib import Path

from tables import accuracy, cell, finish_bars, load, markdown, mean_std, pyplot

# (directory, label, per seed?)
ARMS = [
    ("", "sparse model, no LoRA", False),
    ("naive", "+ LoRA merged naively", False),
    ("masked", "+ LoRA masked as-is (no training)", False),
    ("losa", "+ LoSA masked fine-tuning", True),
    ("full", "+ LoSA, error ranks + distillation", True),
]


def runs(root: Path, base: str, arm: str, per_seed: bool, seeds: list[str], name: str) -> list[Path]:
    if not arm:
        return [root / base / "eval-base.json"]
    dirs = [root / base / f"{arm}-s{s}" for s in seeds] if per_seed else [root / base / arm]
    return [d / name for d in dirs]


def sparsity(root: Path, base: str, arm: str, per_seed: bool, seeds: list[str]) -> str:
    if not arm:
        return f"{load(root / base / 'model' / 'calora.json')['metrics']['sparsity']:.1%}"
    values = [load(p)["sparsity_after"] for p in runs(root, base, arm, per_seed, seeds, "merge.json")]
    return f"{min(values):.1%}"


def plot(root: Path, bases: list[str], seeds: list[str], out: Path) -> None:
    plt = pyplot(out)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ARMS)
    for k, (arm, label, per_seed) in enumerate(ARMS):
        stats = [mean_std([load(p)["perplexity"] for p in runs(root, b, arm, per_seed, seeds, "eval.json")]) for b in bases]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        ax.bar([i + k * width for i in range(len(bases))], means, width, yerr=stds, label=label)
    ax.axhline(load(root / "eval-dense-lora.json")["perplexity"], color="black", linestyle="--", label="dense + LoRA")
    ax.axhline(load(root / "eval-dense.json")["perplexity"], color="grey", linestyle=":", label="dense, no LoRA")
    ax.set_yscale("log")
    finish_bars(ax, fig, bases, len(ARMS), width, out)


def main(root: str, bases: str, seeds: str, png: str | None = None) -> None:
    root, bases, seeds = Path(root), bases.split(), seeds.split()
    if png:
        plot(root, bases, seeds, Path(png))
    dense, dense_lora = load(root / "eval-dense.json"), load(root / "eval-dense-lora.json")
    print(f"Dense model: perplexity {dense['perplexity']:.2f}, task accuracy {accuracy(dense):.3f}; "
          f"dense + LoRA: {dense_lora['perplexity']:.2f}, {accuracy(dense_lora):.3f}. Seeds {', '.join(seeds)}.\n")
    ppl_rows, acc_rows, sp_rows = [], [], []
    for arm, label, per_seed in ARMS:
        evals = {b: [load(p) for p in runs(root, b, arm, per_seed, seeds, "eval.json")] for b in bases}
        ppl_rows.append((label, [cell([e["perplexity"] for e in evals[b]]) for b in bases]))
        acc_rows.append((label, [cell([accuracy(e) for e in evals[b]], "{:.3f}") for b in bases]))
        sp_rows.append((label, [sparsity(root, b, arm, per_seed, seeds) for b in bases]))
    markdown("Perplexity on the held-out text (lower is better), merged models", ["arm", *bases], ppl_rows)
    markdown("Task accuracy (mean over tasks), merged models", ["arm", *bases], acc_rows)
    markdown("Sparsity of the decoder linears after the merge (lowest over seeds)", ["arm", *bases], sp_rows)


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""The llama.cpp results table (docs/results/gguf-smollm2.md) from `make -C recipes gguf`'s outputs:
gguf_table.py ROOT "TYPES" "RANKS" FROM [PLOT.png]. Every number is llama.cpp's (eval --engine llama.cpp)."""

import json
import sys
from pathlib import Path

from tables import load, markdown, pyplot


def mc(result: dict, task: str) -> str:
    t = result.get("tasks", {}).get(task)
    return f"{t['acc']:.3f} / {t['acc_norm']:.3f}" if t else "-"


def seconds(path: Path) -> str:
    return f"{float(path.read_text()):.0f} s" if path.exists() else "-"


def ranks(adapter: Path) -> str:
    """The adapter's LoRA ranks (several when compensation made them differ per module)."""
    if not (adapter / "adapter_config.json").exists():
        return "-"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rs = {cfg["r"], *cfg.get("rank_pattern", {}).values()}
    return "/".join(str(r) for r in sorted(rs))


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f}" if path.exists() else "-"


def main(root: str, types: str, rank_list: str, start: str, png: str | None = None) -> None:
    root = Path(root)
    original = load(root / "F32" / "eval-lora.json")
    rows, plot = [], {}
    rows.append(("F32 (the float model)", ["1. float model + LoRA", f"{original['perplexity']:.2f}", "-",
                                           mc(original, "socialiqa"), mc(original, "quartz"),
                                           mb(root / "F32" / "model" / "model.gguf"), ranks(root / "lora"),
                                           seconds(root / "lora.time")]))
    for t in types.split():
        d = root / t
        if not (d / "eval-asis.json").exists():  # a base not reached yet (make resumes)
            continue
        asis = load(d / "eval-asis.json")
        gap = asis["perplexity"] - original["perplexity"]
        arms = [("base alone, no LoRA", d / "eval-base.json", None, None),
                ("2. LoRA as is (what llama.cpp users do)", d / "eval-asis.json", root / "lora", None)]
        arms += [(f"3. inherit --compensate {r}, no training", d / f"eval-comp{r}.json", d / f"comp{r}",
                  d / f"comp{r}.time") for r in rank_list.split()]
        arms += [(f"3b. LoRA + the base's own rank-{start} compensation (shared)", d / f"eval-basecomp{start}.json",
                  d / f"basecomp{start}", d / f"basecomp{start}.time"),
                 ("4. inherited LoRA trained further on the GGUF base", d / "eval-trained.json", d / "trained",
                  d / "trained.time"),
                 (f"5. (4) started from (3) rank {start}", d / "eval-trained-comp.json", d / "trained-comp",
                  d / "trained-comp.time")]
        plot[t] = {}
        for label, path, adapter, time in arms:
            if not path.exists():
                continue
            r = load(path)
            won = "-" if adapter is None or gap <= 0 else f"{(asis['perplexity'] - r['perplexity']) / gap:.0%}"
            shown = "-" if adapter is None else ranks(adapter)
            if adapter is not None and adapter.name.startswith("basecomp"):  # two adapters at once
                shown = f"{ranks(root / 'lora')} + {shown} shared"
            rows.append((t, [label, f"{r['perplexity']:.2f}", won, mc(r, "socialiqa"), mc(r, "quartz"),
                             mb(d / "model" / "model.gguf"), shown,
                             seconds(time) if time else "-"]))
            if adapter is not None:
                plot[t][label.split(",")[0].replace("inherit --", "")[:34]] = r["perplexity"]
    markdown("Every number measured in llama.cpp (llama-cpp-python 0.3.36): perplexity on the held-out text, "
             "acc / acc_norm on the shipped items; gap won back = (2 - arm) / (2 - 1)",
             ["base", "arm", "perplexity", "gap won back", "SocialIQa acc / acc_norm", "QuaRTz acc / acc_norm",
              "base GGUF MB", "adapter ranks", "wall time"], rows)
    if png:
        draw(plot, original["perplexity"], Path(png))


def draw(plot: dict, reference: float, out: Path) -> None:
    plt = pyplot(out)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    arms = sorted({a for v in plot.values() for a in v})
    width = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        xs = [i + k * width for i, t in enumerate(plot) if arm in plot[t]]
        ax.bar(xs, [plot[t][arm] for t in plot if arm in plot[t]], width, label=arm)
    ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="1. float model + LoRA")
    ax.set_ylim(reference * 0.95, None)
    from tables import finish_bars

    finish_bars(ax, fig, list(plot), len(arms), width, out)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Results table of recipes/ca-lora.mk: perplexity per arm, mean +- std over seeds."""

import sys
from pathlib import Path

from tables import cell, finish_bars, load, mean_std, pyplot

ARMS = [
    ("eval-base", "compressed model, no LoRA"),
    ("eval-asis", "2. compressed + original LoRA as-is"),
    ("new", "3. compressed + new LoRA (same steps)"),
    ("inh", "4. compressed + inherited LoRA, trained further"),
    ("calora", "5. CA-LoRA (inherit + recover)"),
]


def ppl(path: Path) -> float:
    return load(path)["perplexity"]


def plot(root: Path, comps: list[str], seeds: list[str], out: Path) -> None:
    """Grouped bars: perplexity of each arm per compressed model (mean, std over seeds)."""
    plt = pyplot(out)
    if plt is None:
        return
    arms = ARMS[1:]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(arms)
    for k, (key, label) in enumerate(arms):
        means, stds = [], []
        for c in comps:
            vals = ([ppl(root / c / f"{key}.json")] if key.startswith("eval-")
                    else [ppl(root / c / f"s{s}" / f"eval-{key}.json") for s in seeds])
            mean, std = mean_std(vals)
            means.append(mean)
            stds.append(std)
        ax.bar([i + k * width for i in range(len(comps))], means, width, yerr=stds, label=label)
    ax.axhline(ppl(root / "eval-original.json"), color="black", linestyle="--", label="1. original + original LoRA")
    lo = min(b.get_height() for b in ax.patches)
    ax.set_ylim(lo * 0.97, None)
    finish_bars(ax, fig, comps, len(arms), width, out)


def main(root: str, compressions: str, seeds: str, png: str | None = None) -> None:
    root, comps, seeds = Path(root), compressions.split(), seeds.split()
    if png:
        plot(root, comps, seeds, Path(png))
    print(f"Perplexity on the held-out text (lower is better); seeds {', '.join(seeds)}.\n")
    print("| arm | " + " | ".join(comps) + " |")
    print("|---|" + "---|" * len(comps))
    print("| 1. original model + original LoRA | " + " | ".join([f"{ppl(root / 'eval-original.json'):.2f}"] * len(comps)) + " |")
    for key, label in ARMS:
        cells = []
        for c in comps:
            if key.startswith("eval-"):
                cells.append(f"{ppl(root / c / f'{key}.json'):.2f}")
            else:
                cells.append(cell([ppl(root / c / f"s{s}" / f"eval-{key}.json") for s in seeds]))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:5])

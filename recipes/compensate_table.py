"""Results of `make ca-lora-compensate`: per compressed base, each arm's held-out perplexity,
SocialIQa and QuaRTz acc / acc_norm, and the wall time of what the arm adds."""

import sys
from pathlib import Path

from tables import finish_bars, load, pyplot


def arms(root: Path, base: str, ranks: list[str], trained: bool, seeds: list[str]) -> list[tuple[str, Path, Path | None]]:
    """(label, eval json, time file) per arm of one base."""
    rows = [("compressed model, no LoRA", root / base / "eval-base.json", None),
            ("2. compressed + original LoRA as-is", root / base / "mc-asis.json", None)]
    rows += [(f"3. inherited + compensation rank {r}, no training", root / base / f"mc-comp{r}.json",
              root / base / f"comp{r}.time") for r in ranks]
    if trained:
        for s in seeds:
            tag = f" (seed {s})" if len(seeds) > 1 else ""
            rows += [(f"4. inherited, trained further{tag}", root / base / f"s{s}" / "mc-inh.json", None),
                     (f"5. CA-LoRA (inherit + recover){tag}", root / base / f"s{s}" / "mc-calora.json", None),
                     (f"6. CA-LoRA from arm 3 (rank {ranks[0]}){tag}", root / base / f"s{s}" / "mc-calora-comp.json",
                      root / base / f"s{s}" / "calora-comp.time")]
    return rows


def mc(result: dict, task: str) -> str:
    t = result.get("tasks", {}).get(task)
    return f"{t['acc']:.3f} / {t['acc_norm']:.3f}" if t else "–"


def seconds(path: Path | None) -> str:
    if path is None or not path.exists():
        return "–"
    s = float(path.read_text())
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main(root: str, bases: str, ranks: str, trained: str, seeds: str, png: str | None = None) -> None:
    root, bases, ranks, trained, seeds = Path(root), bases.split(), ranks.split(), set(trained.split()), seeds.split()
    original = load(root / "mc-original.json")
    for base in bases:
        print(f"### {base}\n")
        print("| arm | perplexity | SocialIQa acc / acc_norm | QuaRTz acc / acc_norm | wall time of the arm |")
        print("|---|---|---|---|---|")
        print(f"| 1. original model + original LoRA | {original['perplexity']:.2f} | {mc(original, 'socialiqa')} | "
              f"{mc(original, 'quartz')} | – |")
        for label, path, timing in arms(root, base, ranks, base in trained, seeds):
            r = load(path)
            print(f"| {label} | {r['perplexity']:.2f} | {mc(r, 'socialiqa')} | {mc(r, 'quartz')} | {seconds(timing)} |")
        print()
    if png:
        plot(root, bases, ranks, trained, seeds, original["perplexity"], Path(png))


def plot(root, bases, ranks, trained, seeds, original, out):
    plt = pyplot(out)
    if plt is None:
        return
    labels = [a[0] for a in arms(root, bases[0], ranks, False, seeds)][1:]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        heights = [load(next(p for lab, p, _ in arms(root, b, ranks, False, seeds) if lab == label))["perplexity"]
                   for b in bases]
        ax.bar([i + k * width for i in range(len(bases))], heights, width, label=label)
    ax.axhline(original, color="black", linestyle="--", label="1. original + original LoRA")
    ax.set_ylim(min(b.get_height() for b in ax.patches) * 0.95, None)
    finish_bars(ax, fig, bases, len(labels), width, out)


if __name__ == "__main__":
    main(*sys.argv[1:])

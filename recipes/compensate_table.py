"""Results of `make ca-lora-compensate`: per compressed base, each arm's held-out perplexity,
SocialIQa and QuaRTz acc / acc_norm, and the wall time of what the arm adds. A trained arm run with
several seeds shows mean ± sample std over the seeds that have finished (n in the label); an arm
with none yet shows "–" (make requires every file; run the script by hand on a grid in progress).

    compensate_table.py ROOT BASES RANKS TRAINED SEEDS [OUT.png]   # table; plot + its data (OUT.json)
    compensate_table.py --plot RECORD.json OUT.png                 # the plot again from its data"""

import json
import statistics
import sys
from pathlib import Path

from tables import cell, load, mean_std, pyplot

TRAINED = (("4. inherited, trained further", "inh", None),
           ("5. CA-LoRA (inherit + recover)", "calora", "calora"),
           ("6. CA-LoRA from arm 3 (rank {r})", "calora-comp", "calora-comp"))


def arms(root: Path, base: str, ranks: list[str], trained: bool, seeds: list[str]) -> list[tuple[str, list[Path], list[Path]]]:
    """(label, eval jsons, time files) per arm of one base: one path each, or one per seed."""
    rows = [("compressed model, no LoRA", [root / base / "eval-base.json"], []),
            ("2. compressed + original LoRA as-is", [root / base / "mc-asis.json"], [])]
    rows += [(f"3. inherited + compensation rank {r}, no training", [root / base / f"mc-comp{r}.json"],
              [root / base / f"comp{r}.time"]) for r in ranks]
    if trained:
        for label, arm, timed in TRAINED:
            rows.append((label.format(r=ranks[0]), [root / base / f"s{s}" / f"mc-{arm}.json" for s in seeds],
                         [root / base / f"s{s}" / f"{timed}.time" for s in seeds] if timed else []))
    return rows


def finished(paths: list[Path]) -> list[dict]:
    return [load(p) for p in paths if p.exists()]


def mc(results: list[dict], task: str) -> str:
    scores = [r["tasks"][task] for r in results if task in r.get("tasks", {})]
    if not scores:
        return "–"
    return " / ".join(f"{statistics.mean(s[k] for s in scores):.3f}" for k in ("acc", "acc_norm"))


def seconds(paths: list[Path]) -> str:
    times = [float(p.read_text()) for p in paths if p.exists()]
    if not times:
        return "–"
    s = statistics.mean(times)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def record(root: Path, bases: list[str], ranks: list[str], trained: set[str], seeds: list[str]) -> dict:
    """What the plot draws, as plain data: the arm-1 perplexity, and per base each arm's perplexity
    per finished seed. A run writes it beside its table; a results page that gathers runs from
    several machines keeps one assembled by hand from those runs' tables (docs/results/)."""
    return {"original": load(root / "mc-original.json")["perplexity"],
            "bases": {b: [{"arm": label, "perplexity": [r["perplexity"] for r in finished(paths)]}
                          for label, paths, _ in arms(root, b, ranks, b in trained, seeds)[1:]]  # no-LoRA base: off scale
                      for b in bases}}


def main(root: str, bases: str, ranks: str, trained: str, seeds: str, png: str | None = None) -> None:
    root, bases, ranks, trained, seeds = Path(root), bases.split(), ranks.split(), set(trained.split()), seeds.split()
    original = load(root / "mc-original.json")
    for base in bases:
        print(f"### {base}\n")
        print("| arm | perplexity | SocialIQa acc / acc_norm | QuaRTz acc / acc_norm | wall time of the arm |")
        print("|---|---|---|---|---|")
        print(f"| 1. original model + original LoRA | {original['perplexity']:.2f} | {mc([original], 'socialiqa')} | "
              f"{mc([original], 'quartz')} | – |")
        for label, paths, timing in arms(root, base, ranks, base in trained, seeds):
            results = finished(paths)
            n = f" (n = {len(results)} seeds)" if len(paths) > 1 else ""
            ppl = cell([r["perplexity"] for r in results]) if results else "–"
            print(f"| {label}{n} | {ppl} | {mc(results, 'socialiqa')} | {mc(results, 'quartz')} | {seconds(timing)} |")
        print()
    if png:
        data = record(root, bases, ranks, trained, seeds)
        Path(png).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        plot(data, Path(png))


def plot(data: dict, out: Path) -> None:
    """Grouped bars per base, one per arm (several seeds: their mean, sample std as error bar):
    perplexity on the left; on the right the share of the base's gap (arm 2 - arm 1) won back,
    which puts bases with gaps of 4 and 50 perplexity points on one scale."""
    plt = pyplot(out)
    if plt is None:
        return
    bases = list(data["bases"])
    labels = max(([a["arm"] for a in rows] for rows in data["bases"].values()), key=len)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        xs, heights, errors, shares, share_errors = [], [], [], [], []
        for i, b in enumerate(bases):
            arms_of_b = {a["arm"]: a["perplexity"] for a in data["bases"][b]}
            values, as_is = arms_of_b.get(label, []), arms_of_b.get(labels[0], [])
            if not values:
                continue
            m, s = mean_std(values)
            gap = statistics.mean(as_is) - data["original"] if as_is else float("nan")
            xs.append(i + k * width), heights.append(m)
            errors.append(s if len(values) > 1 else float("nan"))  # one seed: no bar rather than a flat one
            shares.append(100 * (statistics.mean(as_is) - m) / gap), share_errors.append(100 * errors[-1] / gap)
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=label)
        gap_ax.bar(xs, shares, width, yerr=share_errors, capsize=2)
    ax.axhline(data["original"], color="black", linestyle="--", label="1. original + original LoRA")
    ax.set_ylim(min(b.get_height() for b in ax.patches) * 0.95, None)
    names = [data.get("names", {}).get(b, b).replace(" + ", " +\n") for b in bases]
    gap_ax.axhline(100, color="black", linestyle="--")
    for a in (ax, gap_ax):
        a.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(bases))], names)
    ax.set_ylabel("held-out perplexity (lower is better)")
    gap_ax.set_ylabel("% of the compression gap won back")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:  # compensate_table.py --plot RECORD.json OUT.png
        plot(load(Path(sys.argv[2])), Path(sys.argv[3]))
    else:
        main(*sys.argv[1:])

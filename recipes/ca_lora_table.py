"""Results table of recipes/ca-lora.mk: perplexity per arm, mean +- std over seeds."""

import json
import statistics
import sys
from pathlib import Path

ARMS = [
    ("eval-base", "compressed model, no LoRA"),
    ("eval-asis", "2. compressed + original LoRA as-is"),
    ("new", "3. compressed + new LoRA (same steps)"),
    ("inh", "4. compressed + inherited LoRA, trained further"),
    ("calora", "5. CA-LoRA (inherit + recover)"),
]


def ppl(path: Path) -> float:
    return json.loads(path.read_text())["perplexity"]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(root: str, compressions: str, seeds: str) -> None:
    root, comps, seeds = Path(root), compressions.split(), seeds.split()
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
    main(*sys.argv[1:4])

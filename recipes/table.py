"""Print a markdown table from `calora eval -o` result files: table.py "label=path.json" ..."""

import json
import sys


def main(args: list[str]) -> None:
    rows = []
    for arg in args:
        label, _, path = arg.partition("=")
        rows.append((label, json.load(open(path))))
    tasks = sorted({t for _, r in rows for t in r.get("tasks", {})})
    head = ["model", "perplexity", *(f"{t} acc / acc_norm" for t in tasks)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, r in rows:
        cells = [label, f"{r['perplexity']:.2f}" if r.get("perplexity") else "-"]
        for t in tasks:
            x = r["tasks"].get(t)
            cells.append(f"{x['acc']:.3f} / {x['acc_norm']:.3f} (n={x['n']})" if x else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

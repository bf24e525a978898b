"""Helpers the recipes' table scripts share: reading results, mean ± std cells, markdown, plots."""

import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def cell(values: list[float], fmt: str = "{:.2f}") -> str:
    """One value as is; several as mean ± sample std."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy(result: dict) -> float:
    """Mean accuracy over the tasks of an eval result (NaN without tasks)."""
    tasks = result.get("tasks", {})
    return statistics.mean(t["acc"] for t in tasks.values()) if tasks else float("nan")


def markdown(title: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> None:
    print(f"{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()


def pyplot(out: Path):
    """matplotlib's pyplot (headless), or None with a note when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot: pip install matplotlib, or '.[recipes]', to draw {Path(out).name})", file=sys.stderr)
        return None
    return plt


def finish_bars(ax, fig, groups: list[str], n_bars: int, width: float, out: Path) -> None:
    """Label grouped bars (one group per column, n_bars per group) and save the figure."""
    ax.set_xticks([i + width * (n_bars - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: bars can fill them
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")

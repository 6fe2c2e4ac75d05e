"""The strategy grid's outputs: the README's markdown table and the grouped-bar plot."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.strategy_grid_setup import STRATEGIES
from tlflax.io import atomic_path

LABELS = {
    "feature_extraction": "feature extraction",
    "top_k": "top-k fine-tune",
    "full": "full fine-tune",
    "scratch": "from scratch",
}


def _picks(picks: list[str]) -> str:
    """The advisor's picks over the seeds, most frequent first: "top-k fine-tune ×2, full"."""
    counts = Counter(picks)
    return ", ".join(
        LABELS[strategy] + (f" ×{count}" if count > 1 else "")
        for strategy, count in counts.most_common()
    )


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """Each cell's strategies (mean ± sample std of test accuracy over its seeds), the
    advisor's picks and their mean, the best strategy and the gap."""
    header = (
        "| dataset | train / class | "
        + " | ".join(LABELS[s] for s in STRATEGIES)
        + " | advisor's picks | advisor (mean) | best | gap | within 1 pt |"
    )
    lines = [header, "|" + "---|" * (len(STRATEGIES) + 7)]
    for cell in cells:
        results = cell["results"]
        figures = []
        for strategy in STRATEGIES:
            result = results[strategy]
            figure = f"{result['test_accuracy_mean']:.3f} ± {result['test_accuracy_std']:.3f}"
            if strategy == "top_k":
                figure += f" (k={'/'.join(map(str, result['unfreeze_groups']))})"
            if strategy == cell["best_by_test"]:
                figure = f"**{figure}**"
            figures.append(figure)
        advisor = cell["advisor"]
        lines.append(
            f"| {cell['dataset']} | {cell['train_per_class']} | "
            + " | ".join(figures)
            + f" | {_picks(advisor['picks'])} | {advisor['test_accuracy_mean']:.3f} | "
            f"{LABELS[cell['best_by_test']]} | {cell['advisor_gap']:.3f} | "
            f"{'yes' if cell['within_target'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(cells: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: each strategy's mean test accuracy per cell with its spread over the
    seeds; a black diamond: the mean test accuracy of the advisor's picks."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    width = 0.8 / len(STRATEGIES)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for position, cell in enumerate(cells):
        for index, strategy in enumerate(STRATEGIES):
            result = cell["results"][strategy]
            axes.bar(
                position + (index - (len(STRATEGIES) - 1) / 2) * width,
                result["test_accuracy_mean"],
                width,
                yerr=result["test_accuracy_std"],
                capsize=2,
                color=colours[index],
                label=LABELS[strategy] if position == 0 else None,
            )
        axes.plot(
            position,
            cell["advisor"]["test_accuracy_mean"],
            marker="D",
            color="black",
            linestyle="none",
            label="advisor's picks (mean)" if position == 0 else None,
        )
    axes.set_xticks(
        range(len(cells)), [f"{c['dataset']}\n{c['train_per_class']}/class" for c in cells]
    )
    axes.set_ylabel("test accuracy")
    # From a tenth below the lowest bar: a from-scratch model near chance stays visible.
    lowest = min(
        (cell["results"][s]["test_accuracy_mean"] for cell in cells for s in STRATEGIES),
        default=0.3,
    )
    axes.set_ylim(max(0.0, math.floor(lowest * 10) / 10 - 0.1), 1.0)
    seeds = len(cells[0]["seeds"]) if cells else 0
    axes.set_title(f"Strategy grid: mean of {seeds} seeds, bars ± sample std")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)

"""The strategy grid's outputs: the README's markdown table and the grouped-bar plot."""

from __future__ import annotations

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


def markdown_table(cells: list[dict[str, Any]]) -> str:
    header = (
        "| dataset | train / class | "
        + " | ".join(LABELS[s] for s in STRATEGIES)
        + " | advisor's pick | best | gap | within 1 pt |"
    )
    lines = [header, "|" + "---|" * (len(STRATEGIES) + 6)]
    for cell in cells:
        results = cell["results"]
        pick = cell["advice"]["strategy"]
        figures = []
        for strategy in STRATEGIES:
            figure = f"{results[strategy]['test_accuracy']:.3f}"
            if strategy == "top_k":
                figure += f" (k={results[strategy]['unfreeze_groups']})"
            if strategy == cell["best_by_test"]:
                figure = f"**{figure}**"
            figures.append(figure)
        lines.append(
            f"| {cell['dataset']} | {cell['train_per_class']} | "
            + " | ".join(figures)
            + f" | {LABELS[pick]} | {LABELS[cell['best_by_test']]} | "
            f"{cell['advisor_gap']:.3f} | {'yes' if cell['within_target'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(cells: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: test accuracy of each strategy per cell; the advisor's pick hatched."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    width = 0.8 / len(STRATEGIES)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for position, cell in enumerate(cells):
        for index, strategy in enumerate(STRATEGIES):
            picked = strategy == cell["advice"]["strategy"]
            axes.bar(
                position + (index - (len(STRATEGIES) - 1) / 2) * width,
                cell["results"][strategy]["test_accuracy"],
                width,
                color=colours[index],
                hatch="//" if picked else None,
                edgecolor="black" if picked else colours[index],
                label=LABELS[strategy] if position == 0 else None,
            )
    axes.set_xticks(
        range(len(cells)), [f"{c['dataset']}\n{c['train_per_class']}/class" for c in cells]
    )
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.3, 1.0)
    axes.set_title("Strategy grid (hatched: the advisor's pick)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)

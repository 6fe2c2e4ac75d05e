"""Figures for reports: learning curves of the ways to use a pretrained network, and references."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tlflax.io import atomic_path


def plot_learning_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    metric: str = "validation accuracy",
    title: str = "",
    reference_lines: Mapping[str, float] | None = None,
) -> None:
    """Write a PNG with one line per curve (x = epoch, starting at 1), atomically.

    Args:
      curves: label → per-epoch values, e.g. {"fine-tuned": [...], "from scratch": [...]}.
      path: where the PNG goes.
      metric: the y-axis label.
      title: the figure title.
      reference_lines: label → a value of the same metric drawn as a horizontal dashed line
        across all epochs, e.g. {"baseline: pixels_rbf_svm(C=10)": 0.81}.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, values in curves.items():
        epochs = range(1, len(values) + 1)
        axes.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=label)
    for label, value in (reference_lines or {}).items():
        axes.axhline(value, linestyle="--", linewidth=1.2, color="0.35", label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)

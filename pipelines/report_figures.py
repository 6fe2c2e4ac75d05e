"""The run report's figures as inline SVG: learning curves, a confusion matrix, reliability.

Drawn with matplotlib's SVG backend on bare ``Figure`` objects (no pyplot, no display), text
kept as text. Each figure salts its element ids with its own name, so several figures inline
in one page never share an id, and carries no date, so the same inputs give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from pipelines.reports import MODEL_LABELS

# Beyond this many classes a confusion matrix's cells are too small to print counts in.
MAX_ANNOTATED_CLASSES = 20


def _plain(text: object) -> str:
    """A label from a file, shown as written: a ``$`` would start matplotlib's math mode."""
    return str(text).replace("$", r"\$")


def _to_svg(figure, name: str) -> str:
    """The ``<svg>`` element of ``figure`` (the XML prologue dropped, for inlining)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"tlflax-{name}"}):
        figure.savefig(
            buffer, format="svg", metadata={"Date": None}, bbox_inches="tight", pad_inches=0.1
        )
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def learning_curves_svg(
    curves: Mapping[str, Sequence[float]], reference_lines: Mapping[str, float]
) -> str:
    """Validation accuracy per epoch, one line per training phase, references dashed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, values in curves.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=_plain(label))
    for label, value in reference_lines.items():
        axes.axhline(value, linestyle="--", linewidth=1.2, color="0.35", label=_plain(label))
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation accuracy")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _to_svg(figure, "learning-curves")


def confusion_svg(class_names: Sequence[str], counts: Sequence[Sequence[int]]) -> str:
    """A heat map of test examples per (actual, predicted) class, counts in the cells."""
    from matplotlib.figure import Figure

    size = len(class_names)
    side = min(max(3.5, 0.42 * size + 2.0), 14.0)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="test examples")
    labels = [_plain(name) for name in class_names]
    axes.set_xticks(range(size), labels, rotation=45, ha="right", fontsize="small")
    axes.set_yticks(range(size), labels, fontsize="small")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("actual class")
    if size <= MAX_ANNOTATED_CLASSES:
        largest = max((max(row) for row in counts), default=0)
        for actual, row in enumerate(counts):
            for predicted, count in enumerate(row):
                colour = "white" if count > largest / 2 else "black"
                axes.text(
                    predicted,
                    actual,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color=colour,
                )
    return _to_svg(figure, "confusion")


def _bins(curve: object) -> tuple[list[float], list[float]] | None:
    """(confidence, accuracy) of a reliability curve's non-empty bins; None if malformed."""
    if not isinstance(curve, Mapping):
        return None
    confidence, accuracy = curve.get("bin_confidence"), curve.get("bin_accuracy")
    if not isinstance(confidence, list) or not isinstance(accuracy, list):
        return None
    count = curve.get("bin_count")
    counts = count if isinstance(count, list) else [1] * len(confidence)
    kept = [
        (float(x), float(y))
        for x, y, n in zip(confidence, accuracy, counts, strict=False)
        if isinstance(x, int | float) and isinstance(y, int | float) and n
    ]
    return ([x for x, _ in kept], [y for _, y in kept]) if kept else None


def reliability_svg(reliability: Mapping[str, object]) -> str | None:
    """One reliability diagram per model: accuracy against confidence per bin, before and
    after calibration, beside the diagonal of perfect calibration. None when no model has
    a readable curve."""
    from matplotlib.figure import Figure

    models = [
        (name, entry)
        for name, entry in reliability.items()
        if isinstance(entry, Mapping) and any(_bins(entry.get(kind)) for kind in _KINDS)
    ]
    if not models:
        return None
    figure = Figure(figsize=(3.2 * len(models) + 0.4, 3.6), layout="constrained")
    axes_list = figure.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for axes, (name, entry) in zip(axes_list, models, strict=True):
        axes.plot([0, 1], [0, 1], linestyle=":", color="0.5", label="perfect calibration")
        for kind, style in _KINDS.items():
            bins = _bins(entry.get(kind))
            if bins:
                axes.plot(*bins, marker="o", markersize=3, label=kind, **style)
        axes.set_title(_plain(MODEL_LABELS.get(name, name)))
        axes.set_xlabel("confidence")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel("accuracy")
    axes_list[0].legend(fontsize="x-small", loc="upper left")
    return _to_svg(figure, "reliability")


_KINDS = {
    "uncalibrated": {"color": "tab:orange"},
    "calibrated": {"color": "tab:blue"},
}

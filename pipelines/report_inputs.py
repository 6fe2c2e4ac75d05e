"""The files a run report and a model card are built from, read once, each None when absent.

A missing input leaves its part of the report out; an input that exists but cannot be read
is also left out, after a warning naming the file (``pipelines.reports.read_json``): the
report of a run never fails on what the run did not write.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.reports import MODEL_LABELS, Warn, data_docs_index, read_json, read_text
from pipelines.stages.common import ExperimentPaths
from pipelines.stages.learning_curves import read_learning_curves


@dataclass(frozen=True)
class ProjectPaths(ExperimentPaths):
    """An experiment's output paths under ``root`` instead of the working directory, so a
    report can be built from another project's files (stages run at the root: ``.``)."""

    root: Path = Path(".")

    @property
    def plots(self) -> Path:
        return self.root / super().plots

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.experiment

    @property
    def export(self) -> Path:
        """Where the export stage leaves the deployable fine-tuned model."""
        return self.root / "models" / self.experiment / "export"

    def metrics(self, stage: str) -> Path:
        return self.root / super().metrics(stage)

    def live(self, stage: str) -> Path:
        return self.root / super().live(stage)


@dataclass(frozen=True)
class Confusion:
    """The fine-tuned model's test confusion counts: ``counts[actual][predicted]``."""

    class_names: list[str]
    counts: list[list[int]]


@dataclass(frozen=True)
class RunInputs:
    """Everything a run report shows; a None (or empty) field is a part left out."""

    experiment: str
    project: Path
    evaluation: dict | None = None
    seeds: dict | None = None
    validation: dict | None = None
    advice: dict | None = None
    advice_markdown: str | None = None
    plan: dict | None = None
    baseline: dict | None = None
    classification: dict | None = None
    reliability: dict | None = None
    confusion: Confusion | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    data_docs: Path | None = None
    export_dir: Path | None = None


def _read_object(path: Path, warn: Warn) -> dict | None:
    """The JSON object in ``path``; None when absent, unreadable or not an object."""
    content = read_json(path, warn)
    if content is not None and not isinstance(content, dict):
        warn(f"report input {path} holds no JSON object, left out")
        return None
    return content


def read_confusion(path: Path, class_order: list[str], warn: Warn) -> Confusion | None:
    """Count the ``actual,predicted`` rows of ``confusion.csv`` (one per test example).

    Classes come in ``class_order`` (the classification report's), then any other name in
    the order it first appears.
    """
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            pairs = [(row["actual"], row["predicted"]) for row in csv.DictReader(handle)]
    except (OSError, ValueError, KeyError, TypeError) as error:
        warn(
            f"report input {path} is unreadable (needs columns actual,predicted), left out: "
            f"{error!r}"
        )
        return None
    names = list(dict.fromkeys([*class_order, *(name for pair in pairs for name in pair)]))
    position = {name: index for index, name in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for actual, predicted in pairs:
        counts[position[actual]][position[predicted]] += 1
    return Confusion(names, counts) if pairs else None


def _class_order(classification: dict | None) -> list[str]:
    """The class names of the fine-tuned model's per-class report, in its order."""
    results = (classification or {}).get("finetune")
    per_class = results.get("per_class") if isinstance(results, dict) else None
    return list(per_class) if isinstance(per_class, dict) else []


def _read_curves(paths: ProjectPaths, warn: Warn) -> dict[str, list[float]]:
    """Validation accuracy per epoch of each training phase (the evaluate stage's reader)."""
    try:
        return read_learning_curves(paths)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warn(f"learning curves in {paths.live('*')} are unreadable, left out: {error!r}")
        return {}


def load_run_inputs(paths: ProjectPaths, warn: Warn) -> RunInputs:
    """Read every report input of ``paths.experiment`` that exists."""
    classification = _read_object(paths.plots / "classification_report.json", warn)
    validation = _read_object(paths.metrics("validate"), warn)
    export_dir = paths.export if paths.export.is_dir() else None
    return RunInputs(
        experiment=paths.experiment,
        project=paths.root,
        evaluation=_read_object(paths.metrics("evaluate"), warn),
        seeds=_read_object(paths.metrics("seeds"), warn),
        validation=validation,
        advice=_read_object(paths.metrics("advice"), warn),
        advice_markdown=read_text(paths.reports / "advice.md", warn),
        plan=_read_object(paths.metrics("plan"), warn),
        baseline=_read_object(paths.metrics("baseline"), warn),
        classification=classification,
        reliability=_read_object(paths.plots / "reliability.json", warn),
        confusion=read_confusion(paths.plots / "confusion.csv", _class_order(classification), warn),
        curves=_read_curves(paths, warn),
        data_docs=data_docs_index(paths.root, paths.experiment, validation),
        export_dir=export_dir,
    )


def number(value: Any, digits: int = 4) -> str:
    """``value`` to ``digits`` decimals; "?" when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    return f"{value:.{digits}f}"


def model_entries(evaluation: dict | None) -> list[tuple[str, dict]]:
    """(model key, its scores) of evaluate.json in report order (reports.MODEL_LABELS)."""
    evaluation = evaluation or {}
    return [
        (name, evaluation[name]) for name in MODEL_LABELS if isinstance(evaluation.get(name), dict)
    ]


def split_sizes(inputs: RunInputs) -> dict[str, int]:
    """Examples per split (train, validation, test): from the validation's split check, else
    from evaluate.json's n_train / n_test."""
    for check in (inputs.validation or {}).get("checks", []):
        if isinstance(check, dict) and check.get("name") == "splits.required_nonempty":
            observed = check.get("observed")
            records = observed.get("records_per_split") if isinstance(observed, dict) else None
            if isinstance(records, dict):
                order = ["train", "validation", "test", *records]
                return {name: records[name] for name in dict.fromkeys(order) if name in records}
    evaluation = inputs.evaluation or {}
    return {
        split: evaluation[f"n_{split}"]
        for split in ("train", "validation", "test")
        if isinstance(evaluation.get(f"n_{split}"), int)
    }

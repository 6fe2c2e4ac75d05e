"""What the flow publishes after a run, built from the files the stages wrote.

Plain functions from metric files to Markdown and table rows: no Prefect, no DVC, so they
can be read (and tested) without a flow run. ``pipelines/flows.py`` turns their output into
Prefect artifacts. Each part appears only when its input file exists and parses: a missing
report input never fails a run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# evaluate.json's model entries, in report order: the classical baseline first, the
# reference every other model's gain_over_baseline is measured from.
MODEL_LABELS = {
    "baseline": "baseline",
    "head_only": "head-only",
    "finetune": "fine-tuned",
    "scratch": "scratch",
}

Warn = Callable[[str], None]


def _score(scores: Any, name: str) -> str:
    """``scores[name]`` to 4 decimals, or "?" where the evaluation left it out."""
    value = scores.get(name) if isinstance(scores, dict) else None
    return f"{value:.4f}" if isinstance(value, int | float) else "?"


def _gain_points(scores: Any) -> str | None:
    """The accuracy gain over the baseline in percentage points ("+1.23", "-0.40"), if any."""
    gain = scores.get("gain_over_baseline") if isinstance(scores, dict) else None
    return f"{100 * gain:+.2f}" if isinstance(gain, int | float) else None


def _baseline_label(scores: Any) -> str:
    """``baseline (<model>)``, or ``baseline`` where the evaluation left the model out."""
    model = scores.get("model") if isinstance(scores, dict) else None
    return f"baseline ({model})" if model else "baseline"


def summary_line(metrics: dict) -> str:
    """One line comparing the test results: the classical baseline first, then each model
    with its gain over it (the head-only, fine-tuned and scratch models)."""
    parts = [
        f"test set: {metrics.get('n_test', '?')} examples, trained on {metrics.get('n_train', '?')}"
    ]
    for name, label in MODEL_LABELS.items():
        if name not in metrics:
            continue
        scores = metrics[name]
        if name == "baseline":
            label = _baseline_label(scores)
        notes = [f"macro-F1 {_score(scores, 'macro_f1')}"]
        gain = _gain_points(scores)
        if gain is not None:
            notes.append(f"{gain} pts vs baseline")
        parts.append(f"{label} accuracy {_score(scores, 'accuracy')} ({', '.join(notes)})")
    return "; ".join(parts)


def artifact_key(experiment: str, kind: str) -> str:
    """A stable artifact key (lowercase letters, digits, dashes), so reports version per run."""
    return re.sub(r"[^a-z0-9]+", "-", f"tlflax-{experiment}-{kind}".lower()).strip("-")


def read_text(path: Path, warn: Warn) -> str | None:
    """The UTF-8 text of ``path``; None when it is missing, or (after ``warn``) unreadable."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        warn(f"report input {path} is unreadable, left out: {error}")
        return None


def read_json(path: Path, warn: Warn) -> Any | None:
    """The JSON in ``path``; None when it is missing, or (after ``warn``) unreadable."""
    text = read_text(path, warn)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as error:
        warn(f"report input {path} is unreadable, left out: {error}")
        return None


def read_experiment(project: Path, pipeline_file: str) -> str | None:
    """The experiment named in the params.yaml beside the pipeline file (after any
    overrides): it names the pipeline's output paths."""
    params_file = (project / pipeline_file).parent / "params.yaml"
    if not params_file.is_file():
        return None
    experiment = (yaml.safe_load(params_file.read_text()) or {}).get("experiment")
    return str(experiment) if experiment is not None else None


def _link(project: Path, path: Path) -> str:
    shown = path.relative_to(project) if path.is_relative_to(project) else path
    return f"[`{shown}`]({path.resolve().as_uri()})"


def metrics_section(metrics: dict) -> list[str]:
    """The test-set table: one row per model, the baseline first, with each gain over it."""
    lines = [
        "## Test-set metrics",
        "",
        "| model | accuracy | macro-F1 | vs baseline (pts) |",
        "|---|---|---|---|",
    ]
    for name, label in MODEL_LABELS.items():
        if name in metrics:
            scores = metrics[name]
            if name == "baseline":
                label, gain = _baseline_label(scores), "reference"
            else:
                gain = _gain_points(scores) or "?"
            lines.append(
                f"| {label} | {_score(scores, 'accuracy')} | {_score(scores, 'macro_f1')} "
                f"| {gain} |"
            )
    if "n_test" in metrics:
        lines += ["", f"{metrics['n_test']} test examples; trained on {metrics.get('n_train')}."]
    return lines


def validation_section(validation: dict) -> list[str]:
    verdict = "PASSED" if validation.get("success") else "FAILED"
    lines = [
        "## Data validation",
        "",
        f"**{verdict}**: {validation.get('num_checks', '?')} checks, "
        f"{validation.get('num_critical_failures', '?')} critical failures, "
        f"{validation.get('num_warnings', '?')} warnings.",
    ]
    failed = [
        check
        for check in validation.get("checks", [])
        if isinstance(check, dict) and not check.get("passed", True)
    ]
    if failed:
        lines += ["", "| check | severity | observed | threshold |", "|---|---|---|---|"]
        lines += [
            f"| {check.get('name')} | {check.get('severity')} | {check.get('observed')} "
            f"| {check.get('threshold')} |"
            for check in failed
        ]
    return lines


def data_docs_index(project: Path, experiment: str, validation: dict | None) -> Path | None:
    """The Great Expectations Data Docs page of the experiment's last validation, if any."""
    named = (validation or {}).get("data_docs_index")
    candidates = [project / named] if named else []
    candidates += sorted((project / "reports" / experiment / "data_docs").glob("**/index.html"))
    return next((path for path in candidates if path.is_file()), None)


def report_markdown(
    project: Path, experiment: str, warn: Warn, plots_index: Path | None = None
) -> str | None:
    """The run's Markdown report (metrics, validation, links); None when nothing is there yet.

    Args:
        project: the DVC project root.
        experiment: names the ``metrics/<experiment>/`` and ``reports/<experiment>/`` paths.
        warn: told about report inputs that exist but cannot be read.
        plots_index: the rendered ``dvc plots show`` page, when there is one.
    """
    metrics = read_json(project / "metrics" / experiment / "evaluate.json", warn)
    validation = read_json(project / "metrics" / experiment / "validate.json", warn)
    sections = [f"# tlflax report: experiment `{experiment}`"]
    if isinstance(metrics, dict):
        sections.append("\n".join(metrics_section(metrics)))
    if isinstance(validation, dict):
        sections.append("\n".join(validation_section(validation)))
    links = []
    run_report = project / "reports" / experiment / "index.html"
    if run_report.is_file():
        links.append(f"- Run report (self-contained page): {_link(project, run_report)}")
    model_card = project / "reports" / experiment / "MODEL_CARD.md"
    if model_card.is_file():
        links.append(f"- Model card: {_link(project, model_card)}")
    data_docs = data_docs_index(project, experiment, validation)
    if data_docs:
        links.append(f"- Great Expectations Data Docs: {_link(project, data_docs)}")
    if plots_index:
        links.append(f"- DVC plots: {_link(project, plots_index)}")
    if links:
        sections.append("\n".join(["## Reports", "", *links]))
    return "\n\n".join(sections) if len(sections) > 1 else None


def advice_report(project: Path, experiment: str, warn: Warn) -> str | None:
    """The advise stage's recommendation with its evidence (``reports/<experiment>/advice.md``)."""
    return read_text(project / "reports" / experiment / "advice.md", warn)


def per_class_rows(project: Path, experiment: str, warn: Warn) -> list[dict[str, Any]]:
    """One row per (model, class) of the evaluation's classification report."""
    report = read_json(project / "plots" / experiment / "classification_report.json", warn)
    if not isinstance(report, dict):
        return []
    return [
        {"model": MODEL_LABELS.get(model, model), "class": name, **scores}
        for model, results in report.items()
        if isinstance(results, dict)
        for name, scores in results.get("per_class", {}).items()
        if isinstance(scores, dict)
    ]

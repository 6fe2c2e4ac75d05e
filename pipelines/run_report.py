"""One experiment's run report: a single self-contained HTML page, readable offline.

Figures are inline SVG (``pipelines.report_figures``), the style sheet is inline, and nothing
is loaded from the network: the page opens from the file system as it is. Each section
appears only when its input exists (``pipelines.report_inputs``); what was left out is said
at the end. No Prefect, no DVC: the ``report`` stage and the flow's artifacts call it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines import report_figures
from pipelines.model_card import model_card_markdown
from pipelines.report_html import (
    escape,
    markdown_html,
    paragraph,
    plan_tables,
    relative_link,
    section,
    table,
)
from pipelines.report_inputs import (
    ProjectPaths,
    RunInputs,
    load_run_inputs,
    model_entries,
    number,
    split_sizes,
)
from pipelines.reports import MODEL_LABELS, Warn, summary_line
from tlflax.config import Params
from tlflax.io import atomic_path

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 2em 3em; color: #1d232a; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f5f7; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th[colspan] { text-align: center; }
figure { margin: 0.5em 0 1em; }
figure svg { max-width: 100%; height: auto; }
figcaption, .note { color: #57606a; font-size: 0.9em; }
.passed { color: #1a7f37; font-weight: 700; }
.failed { color: #cf222e; font-weight: 700; }
.advice { border-left: 3px solid #d0d7de; padding-left: 1em; }
.advice h1 { font-size: 1.2em; } .advice h2 { font-size: 1.05em; border: none; }
.advice th, .advice td, .plan th, .plan td { text-align: left; }
"""

ORDER = (
    ("metrics", "Test metrics"),
    ("seeds", "Across seeds"),
    ("curves", "Learning curves"),
    ("confusion", "Confusion matrix (fine-tuned)"),
    ("per-class", "Per-class test metrics"),
    ("calibration", "Calibration"),
    ("validation", "Data validation"),
    ("advice", "Strategy advice"),
    ("plan", "Training plan"),
    ("files", "Files"),
)


def _label(name: str, scores: dict) -> str:
    label = MODEL_LABELS.get(name, name)
    return f"{label} ({scores['model']})" if name == "baseline" and scores.get("model") else label


# Largest / smallest test class above which accuracy mostly measures the large classes.
IMBALANCED_TEST_RATIO = 1.5


def _leading_scores(evaluation: dict) -> list[tuple[str, str]]:
    """(key, title) of the score columns in order: macro-F1 and balanced accuracy first
    when the test split is imbalanced, accuracy first otherwise."""
    ratio = evaluation.get("test_class_ratio")
    if isinstance(ratio, int | float) and ratio > IMBALANCED_TEST_RATIO:
        return [
            ("macro_f1", "macro-F1"),
            ("balanced_accuracy", "balanced accuracy"),
            ("accuracy", "accuracy"),
        ]
    return [("accuracy", "accuracy"), ("macro_f1", "macro-F1")]


def metrics_body(inputs: RunInputs) -> str | None:
    entries = model_entries(inputs.evaluation)
    if not entries:
        return None
    optional = [
        (key, title)
        for key, title in (("ece_uncalibrated", "ECE uncalibrated"), ("temperature", "temperature"))
        if any(key in scores for _, scores in entries)
    ]
    leading = _leading_scores(inputs.evaluation)
    rows = []
    for name, scores in entries:
        gain = scores.get("gain_over_baseline")
        versus = (
            "reference"
            if name == "baseline"
            else (f"{100 * gain:+.2f}" if isinstance(gain, int | float) else "?")
        )
        extra = [number(scores.get(key)) if key in scores else "" for key, _ in optional]
        rows.append(
            [
                _label(name, scores),
                *(number(scores.get(key)) for key, _ in leading),
                number(scores.get("ece")),
                *extra,
                versus,
            ]
        )
    headers = [
        "model",
        *(title for _, title in leading),
        "ECE",
        *(t for _, t in optional),
        "vs baseline (pts)",
    ]
    return table(headers, rows) + paragraph(summary_line(inputs.evaluation), "note")


def seeds_body(inputs: RunInputs) -> str | None:
    seeds = inputs.seeds or {}
    models, runs = seeds.get("models"), seeds.get("runs")
    if not isinstance(models, dict) or not models:
        return None
    runs = runs if isinstance(runs, dict) else {}
    seed_names = [str(seed) for seed in seeds.get("seeds", runs)]
    rows = []
    for name in [
        *(n for n in MODEL_LABELS if n in models),
        *(n for n in models if n not in MODEL_LABELS),
    ]:
        summary = models[name] if isinstance(models[name], dict) else {}
        per_seed = [
            number((runs.get(seed, {}).get(name) or {}).get("accuracy")) for seed in seed_names
        ]
        rows.append(
            [
                MODEL_LABELS.get(name, name),
                f"{number(summary.get('accuracy_mean'))} ± {number(summary.get('accuracy_std'))}",
                f"{number(summary.get('macro_f1_mean'))} ± {number(summary.get('macro_f1_std'))}",
                *per_seed,
            ]
        )
    headers = [
        "model",
        "accuracy mean ± std",
        "macro-F1 mean ± std",
        *(f"seed {seed} accuracy" for seed in seed_names),
    ]
    redrawn = ", ".join(str(name) for name in seeds.get("seed_params", []))
    note = (
        f"{len(seed_names)} seeds ({', '.join(seed_names)}); standard deviation with "
        f"ddof={seeds.get('std_ddof', '?')}." + (f" Each seed sets {redrawn}." if redrawn else "")
    )
    return table(headers, rows) + paragraph(note, "note")


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def curves_body(inputs: RunInputs) -> str | None:
    if not inputs.curves:
        return None
    baseline = inputs.baseline or {}
    references = {}
    if isinstance(baseline.get("validation_accuracy"), int | float):
        references[f"baseline: {baseline.get('model', '?')}"] = baseline["validation_accuracy"]
    svg = report_figures.learning_curves_svg(inputs.curves, references)
    return _figure(
        svg,
        "Validation accuracy after each epoch of each training phase "
        "(dvclive logs), the classical baseline's as a dashed line.",
    )


def confusion_body(inputs: RunInputs) -> str | None:
    if inputs.confusion is None:
        return None
    svg = report_figures.confusion_svg(inputs.confusion.class_names, inputs.confusion.counts)
    total = sum(map(sum, inputs.confusion.counts))
    return _figure(
        svg,
        f"The fine-tuned model on the {total} test examples: rows are the "
        "actual class, columns the predicted one.",
    )


def per_class_body(inputs: RunInputs) -> str | None:
    reports = {
        name: results["per_class"]
        for name, results in (inputs.classification or {}).items()
        if isinstance(results, dict) and isinstance(results.get("per_class"), dict)
    }
    if not reports:
        return None
    classes = list(dict.fromkeys(name for per_class in reports.values() for name in per_class))
    group = "".join(
        f'<th colspan="3">{escape(MODEL_LABELS.get(name, name))}</th>' for name in reports
    )
    rows = []
    for name in classes:
        cells = [reports[model].get(name) or {} for model in reports]
        support = next((c.get("support") for c in cells if "support" in c), "?")
        scores = [number(c.get(key), 3) for c in cells for key in ("precision", "recall", "f1")]
        rows.append([name, support, *scores])
    headers = ["class", "support", *(["precision", "recall", "F1"] * len(reports))]
    return table(headers, rows, header_rows=[f'<tr><th colspan="2"></th>{group}</tr>'])


def calibration_body(inputs: RunInputs) -> str | None:
    svg = report_figures.reliability_svg(inputs.reliability) if inputs.reliability else None
    if svg is None:
        return None
    return _figure(
        svg,
        "Reliability diagrams on the test set: accuracy against mean confidence "
        "per confidence bin, before and after calibration (empty bins left out).",
    )


def validation_body(inputs: RunInputs, page_dir: Path) -> str | None:
    validation = inputs.validation
    if validation is None:
        return None
    passed = validation.get("success") is True
    verdict = (
        f'<p><span class="{"passed" if passed else "failed"}">'
        f"{'PASSED' if passed else 'FAILED'}</span>: "
        f"{escape(validation.get('num_checks', '?'))} checks, "
        f"{escape(validation.get('num_critical_failures', '?'))} critical failures, "
        f"{escape(validation.get('num_warnings', '?'))} warnings.</p>"
    )
    sizes = split_sizes(inputs)
    if sizes:
        verdict += paragraph(
            "Examples per split: "
            + ", ".join(f"{split} {count}" for split, count in sizes.items()),
            "note",
        )
    failed = [
        c for c in validation.get("checks", []) if isinstance(c, dict) and not c.get("passed", True)
    ]
    if failed:
        verdict += table(
            ["check", "severity", "observed", "threshold"],
            [
                [c.get("name"), c.get("severity"), c.get("observed"), c.get("threshold")]
                for c in failed
            ],
        )
    if inputs.data_docs is not None:
        verdict += (
            "<p>Every expectation, with its observed values: "
            + relative_link(inputs.data_docs, page_dir, "Great Expectations Data Docs")
            + "</p>"
        )
    return verdict


def advice_body(inputs: RunInputs) -> str | None:
    if inputs.advice_markdown is not None:
        return f'<div class="advice">{markdown_html(inputs.advice_markdown)}</div>'
    advice = inputs.advice
    if not advice:
        return None
    schedule = advice.get("schedule") if isinstance(advice.get("schedule"), dict) else {}
    facts = [
        ["strategy", advice.get("strategy", "?")],
        ["layer groups trained (from the top)", advice.get("unfreeze_groups", "?")],
        ["layer-wise LR decay", advice.get("layer_lr_decay", "?")],
        [
            "schedule",
            f"{schedule.get('steps', '?')} steps, {schedule.get('warmup_steps', '?')} "
            f"warmup ({schedule.get('rule', '?')})",
        ],
        [
            "data size / similarity",
            f"{advice.get('size_regime', '?')} / {advice.get('similarity', '?')}",
        ],
    ]
    reasons = "".join(f"<li>{escape(reason)}</li>" for reason in advice.get("reasons", []))
    return table(["advice", "value"], facts) + (f"<ul>{reasons}</ul>" if reasons else "")


def files_body(inputs: RunInputs, page_dir: Path) -> str | None:
    links = ['<li><a href="MODEL_CARD.md">Model card</a> (MODEL_CARD.md, beside this page)</li>']
    if inputs.export_dir is not None:
        links.append(
            "<li>Exported fine-tuned model: "
            + relative_link(inputs.export_dir, page_dir, f"models/{inputs.experiment}/export/")
            + "</li>"
        )
    return f"<ul>{''.join(links)}</ul>"


# Where each section's input lives, said when the section is left out.
INPUTS = {
    "metrics": "metrics/{e}/evaluate.json",
    "seeds": "metrics/{e}/seeds.json (written by python -m pipelines.seeds)",
    "curves": "dvclive/{e}/*/plots/metrics/validation_accuracy.tsv",
    "confusion": "plots/{e}/confusion.csv",
    "per-class": "plots/{e}/classification_report.json",
    "calibration": "plots/{e}/reliability.json",
    "validation": "metrics/{e}/validate.json",
    "advice": "reports/{e}/advice.md or metrics/{e}/advice.json",
    "plan": "metrics/{e}/plan.json",
}


def _bodies(inputs: RunInputs, page_dir: Path) -> dict[str, Callable[[], str | None]]:
    """Each section's builder, called by :func:`run_report_html` one at a time."""
    return {
        "metrics": lambda: metrics_body(inputs),
        "seeds": lambda: seeds_body(inputs),
        "curves": lambda: curves_body(inputs),
        "confusion": lambda: confusion_body(inputs),
        "per-class": lambda: per_class_body(inputs),
        "calibration": lambda: calibration_body(inputs),
        "validation": lambda: validation_body(inputs, page_dir),
        "advice": lambda: advice_body(inputs),
        "plan": lambda: plan_tables(inputs.plan) if inputs.plan else None,
        "files": lambda: files_body(inputs, page_dir),
    }


def run_report_html(inputs: RunInputs, page_dir: Path, warn: Warn) -> str:
    """The whole page; ``page_dir`` is where it will be written (links are relative to it).

    A section whose input is absent is left out and named in the closing note; one whose
    input has an unexpected shape is left out too, after ``warn``.
    """
    bodies = _bodies(inputs, page_dir)
    sections, left_out = [], []
    for anchor, title in ORDER:
        try:
            body = bodies[anchor]()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            warn(f"report section '{title}' left out: its input is malformed ({error!r})")
            body = None
        if body:
            sections.append((anchor, title, body))
        elif anchor in INPUTS:
            left_out.append(f"{title}: no {INPUTS[anchor].format(e=inputs.experiment)}")
    nav = " ".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title, _ in sections)
    content = "".join(section(anchor, title, body) for anchor, title, body in sections)
    if left_out:
        items = "".join(f"<li>{escape(line)}</li>" for line in left_out)
        content += section("left-out", "Not in this report", f'<ul class="note">{items}</ul>')
    title = f"tlflax run report: {inputs.experiment}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<nav>{nav}</nav>{content}</body></html>\n"
    )


def write_run_reports(
    paths: ProjectPaths, output_dir: Path, warn: Warn, params: Params | None = None
) -> tuple[Path, Path]:
    """Write ``index.html`` and ``MODEL_CARD.md`` for ``paths.experiment`` to ``output_dir``
    (atomically each); returns their paths."""
    inputs = load_run_inputs(paths, warn)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("index.html", run_report_html(inputs, output_dir, warn)),
        ("MODEL_CARD.md", model_card_markdown(inputs, params)),
    ):
        with atomic_path(output_dir / name) as temporary:
            temporary.write_text(text, encoding="utf-8")
        written.append(output_dir / name)
    return written[0], written[1]

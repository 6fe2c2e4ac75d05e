"""The run report (one offline HTML page) and the model card, built from a real run's files.

The inputs are the vision experiment's own outputs, copied from this checkout: the tracked
metrics and plots, the dvclive logs (when this checkout has them, else a short log written by
the training stages' own writer), and advice.md rendered from the tracked advice.json by the
advise stage's renderer. The page is opened in headless Chromium with the network cut off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from pipelines.model_card import _input_description, _plan_line
from pipelines.report_inputs import ProjectPaths
from pipelines.reports import MODEL_LABELS, report_markdown
from pipelines.run_report import write_run_reports
from pipelines.stages.common import write_live_log
from tests.browser import render_dom
from tests.conftest import ROOT
from tlflax.advice_report import advice_markdown
from tlflax.advice_rules import Advice
from tlflax.config import load_params, parse_params

EXPERIMENT = "vision"
TRAINING_STAGES = ("train_head", "finetune", "train_scratch")
# A reliability.json in the evaluate stage's format: per model, per calibration state.
RELIABILITY = {
    model: {
        state: {
            # An empty bin's confidence and accuracy are null.
            "bin_confidence": [None, 0.15, 0.45, 0.75, 0.95],
            "bin_accuracy": [None, 0.1 + shift, 0.4 + shift, 0.7 + shift, 0.9 + shift],
            "bin_count": [0, 3, 40, 200, 700],
        }
        for state, shift in (("calibrated", 0.0), ("uncalibrated", -0.08))
    }
    for model in ("head_only", "finetune")
}


def _copy_run(destination: Path) -> Path:
    """A project folder holding the vision run's report inputs."""
    for folder in (f"metrics/{EXPERIMENT}", f"plots/{EXPERIMENT}"):
        shutil.copytree(ROOT / folder, destination / folder)
    for stage in TRAINING_STAGES:
        live = Path("dvclive") / EXPERIMENT / stage
        if (ROOT / live / "plots").is_dir():
            shutil.copytree(ROOT / live, destination / live)
        else:  # a checkout without the DVC outputs: a log of the same form
            write_live_log(destination / live, [{"validation_accuracy": a} for a in (0.5, 0.7)])
    advice = json.loads((destination / f"metrics/{EXPERIMENT}/advice.json").read_text())
    reports = destination / "reports" / EXPERIMENT
    reports.mkdir(parents=True)
    (reports / "advice.md").write_text(
        advice_markdown(Advice.from_json(advice), title=f"{EXPERIMENT}: advice")
    )
    (reports / "data_docs").mkdir()
    (reports / "data_docs" / "index.html").write_text("<html><body>Data Docs</body></html>")
    (destination / f"plots/{EXPERIMENT}/reliability.json").write_text(json.dumps(RELIABILITY))
    return destination


def _build(project: Path, warnings: list[str] | None = None) -> tuple[Path, Path]:
    warn = warnings.append if warnings is not None else print
    return write_run_reports(
        ProjectPaths(EXPERIMENT, project),
        project / "reports" / EXPERIMENT,
        warn,
        load_params(ROOT / "params.yaml"),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The project, and its report page's DOM after Chromium rendered it."""
    project = _copy_run(tmp_path_factory.mktemp("run"))
    page, _ = _build(project)
    return project, render_dom(page, wait_ms=1000)


class _Elements(HTMLParser):
    """Each element's tag and attributes, and the text of every table row, by section."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.rows: dict[str | None, list[list[str]]] = {}
        self.section: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "section":
            self.section = attributes.get("id")
        if tag == "tr":
            self.rows.setdefault(self.section, []).append([])
        if tag in ("td", "th") and self.rows.get(self.section):
            self.rows[self.section][-1].append("")
        self.elements.append((tag, attributes, self.section))

    def handle_data(self, data: str) -> None:
        rows = self.rows.get(self.section)
        if rows and rows[-1]:
            rows[-1][-1] += data


def _parse(dom: str) -> _Elements:
    parser = _Elements()
    parser.feed(dom)
    return parser


def _sections(parsed: _Elements) -> set[str]:
    return {attrs["id"] for tag, attrs, _ in parsed.elements if tag == "section"}


def test_the_page_draws_its_figures_offline_with_nothing_from_the_network(built) -> None:
    _, dom = built
    parsed = _parse(dom)
    for figure in ("curves", "confusion", "calibration"):
        paths = [
            attrs.get("d", "")
            for tag, attrs, section in parsed.elements
            if tag == "path" and section == figure
        ]
        svgs = [1 for tag, _, section in parsed.elements if tag == "svg" and section == figure]
        assert len(svgs) == 1, figure
        assert sum(len(d) > 20 for d in paths) >= 5, f"{figure}: no drawn paths"
    remote = [
        (tag, attrs)
        for tag, attrs, _ in parsed.elements
        for name in ("src", "href")
        if re.match(r"\s*(https?:)?//", attrs.get(name, ""))
    ]
    assert remote == []
    assert not [tag for tag, attrs, _ in parsed.elements if tag in ("script", "link")]
    assert "@import" not in dom


def test_the_metrics_table_holds_evaluate_json_numbers(built) -> None:
    project, dom = built
    evaluation = json.loads((project / f"metrics/{EXPERIMENT}/evaluate.json").read_text())
    rows = {row[0]: row for row in _parse(dom).rows["metrics"][1:]}
    models = [name for name in MODEL_LABELS if name in evaluation]
    assert len(rows) == len(models) == 4
    for name in models:
        label = MODEL_LABELS[name]
        if name == "baseline":
            label += f" ({evaluation[name]['model']})"
        assert rows[label][1] == f"{evaluation[name]['accuracy']:.4f}"
        assert rows[label][2] == f"{evaluation[name]['macro_f1']:.4f}"


def test_the_seed_table_holds_the_mean_and_std_of_every_seed(built) -> None:
    project, dom = built
    seeds = json.loads((project / f"metrics/{EXPERIMENT}/seeds.json").read_text())
    rows = {row[0]: row for row in _parse(dom).rows["seeds"][1:]}
    fine = seeds["models"]["finetune"]
    assert rows["fine-tuned"][1] == f"{fine['accuracy_mean']:.4f} ± {fine['accuracy_std']:.4f}"
    listed = ", ".join(str(seed) for seed in seeds["seeds"])
    assert f"{len(seeds['seeds'])} seeds ({listed})" in dom


def test_the_page_links_the_data_docs_and_shows_advice_plan_and_classes(built) -> None:
    project, dom = built
    parsed = _parse(dom)
    assert {"per-class", "validation", "advice", "plan", "files"} <= _sections(parsed)
    links = [attrs["href"] for tag, attrs, _ in parsed.elements if tag == "a" and "href" in attrs]
    assert "data_docs/index.html" in links  # relative: the page sits in reports/vision/
    assert "PASSED" in dom
    classes = json.loads((project / f"plots/{EXPERIMENT}/classification_report.json").read_text())
    per_class_rows = [row[0] for row in parsed.rows["per-class"][2:]]
    assert per_class_rows == list(classes["finetune"]["per_class"])
    plan = json.loads((project / f"metrics/{EXPERIMENT}/plan.json").read_text())
    assert (
        next(row for row in parsed.rows["plan"] if row[0] == "learning_rate")
        == ["learning_rate", "0.0003", "0.003"]
        and plan["finetune"]["learning_rate"] == 0.0003
    )


def test_missing_inputs_leave_their_sections_out(tmp_path: Path) -> None:
    project = _copy_run(tmp_path / "run")
    for name in (
        "metrics/vision/seeds.json",
        "plots/vision/reliability.json",
        "plots/vision/confusion.csv",
        "reports/vision/advice.md",
    ):
        (project / name).unlink()
    shutil.rmtree(project / "dvclive")
    page, card = _build(project)
    parsed = _parse(render_dom(page, wait_ms=500))
    sections = _sections(parsed)
    assert {"seeds", "calibration", "confusion", "curves"}.isdisjoint(sections)
    assert {"metrics", "per-class", "advice", "left-out"} <= sections  # advice.json stands in
    assert "Calibration: no plots/vision/reliability.json" in page.read_text()
    assert "one seed only" in card.read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    page, card = _build(empty)
    assert _sections(_parse(page.read_text())) == {"files", "left-out"}
    assert card.read_text().startswith("# Model card: vision")


def test_values_from_files_are_escaped(tmp_path: Path) -> None:
    project = _copy_run(tmp_path)
    hostile = "<script>alert(1)</script> $5 & co"
    report_path = project / "plots/vision/classification_report.json"
    report = json.loads(report_path.read_text())
    per_class = report["finetune"]["per_class"]
    report["finetune"]["per_class"] = {hostile: per_class.pop("Shirt"), **per_class}
    report_path.write_text(json.dumps(report))
    confusion = project / "plots/vision/confusion.csv"
    confusion.write_text(confusion.read_text().replace("Shirt", hostile))
    page, card = _build(project)
    dom = render_dom(page, wait_ms=500)
    assert not [tag for tag, _, _ in _parse(dom).elements if tag == "script"]
    assert "&lt;script&gt;alert" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt; $5 &amp; co" in card.read_text()


def test_the_model_card_states_metrics_gains_and_calibration(tmp_path: Path) -> None:
    project = _copy_run(tmp_path)
    evaluate = project / "metrics/vision/evaluate.json"
    evaluation = json.loads(evaluate.read_text())
    evaluation["finetune"] |= {"ece_uncalibrated": 0.1234, "temperature": 1.5}
    evaluate.write_text(json.dumps(evaluation))
    _, card_path = _build(project)
    card = card_path.read_text()
    fine = evaluation["finetune"]
    assert f"| fine-tuned | {fine['accuracy']:.4f} | {fine['macro_f1']:.4f} |" in card
    assert (
        f"- fine-tuned: ECE {fine['ece']:.4f} after temperature scaling (temperature 1.500, "
        "fitted on the validation split); 0.1234 before." in card
    )
    assert f"- baseline: ECE {evaluation['baseline']['ece']:.4f}." in card
    gain = 100 * (fine["accuracy"] - evaluation["baseline"]["accuracy"])
    assert f"- over baseline: {gain:+.2f} pts in this run; " in card
    assert "over 3 seeds" in card and "seeds 0, 1, 2" in card
    assert "`efficientnet_lite0`" in card and "layer groups 7, 13, 14" in card
    assert "Trained on 100 examples per class" in card and "64×64 pixels" in card
    assert "**PASSED**" in card and "not evaluated on other distributions" in card


@pytest.mark.parametrize(("side", "kept"), [("right", "first"), ("left", "last")])
def test_the_model_card_says_which_end_of_a_long_text_is_kept(side: str, kept: str) -> None:
    raw = yaml.safe_load((ROOT / "experiments/text/params.yaml").read_text())
    raw["extract"]["truncation_side"] = side
    described = _input_description(parse_params(raw))
    max_length = raw["extract"]["max_length"]
    assert (
        f"truncated to {max_length} WordPiece tokens (a longer text keeps its {kept}" in described
    )


def test_the_prefect_report_links_the_run_report(built) -> None:
    project, _ = built
    markdown = report_markdown(project, EXPERIMENT, print)
    page = (project / "reports/vision/index.html").resolve().as_uri()
    assert f"[`reports/vision/index.html`]({page})" in markdown
    assert "MODEL_CARD.md" in markdown


def test_the_stage_writes_both_files(tmp_path: Path) -> None:
    project = _copy_run(tmp_path)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.stages.report"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (project / "reports/vision/index.html").read_text().startswith("<!DOCTYPE html>")
    assert "## Metrics (test set)" in (project / "reports/vision/MODEL_CARD.md").read_text()


@pytest.mark.parametrize(
    ("experiment", "modality", "augmentation"),
    [
        ("vision", "image", "random_crop, flip, test_time_flip, random_erasing 0.5"),
        ("text", "text", "none"),
        ("audio", "audio", "none"),
    ],
)
def test_the_model_card_lists_only_the_augmentation_the_modality_applies(
    experiment: str, modality: str, augmentation: str
) -> None:
    """The committed plans hold the image defaults (random_crop, flip) for text and audio
    too; their training never crops or flips, so their cards must not say it does."""
    plan = json.loads((ROOT / f"metrics/{experiment}/plan.json").read_text())
    line = _plan_line("fine-tuning", plan["finetune"], modality)
    assert line.endswith(f", augmentation: {augmentation}."), line
    # The BatchNorm setting only where the network has BatchNorm (not the text transformer).
    assert ("batchnorm" in line) == (modality != "text"), line
    # Weight mixes where fine-tuning tried them, never for the from-scratch run (random start).
    mixes = {**plan["finetune"], "weight_mixes": [0.25, 0.5]}
    assert "weight_mixes 0.25, 0.5" in _plan_line("fine-tuning", mixes, modality)
    assert "weight_mixes" not in _plan_line("from scratch", plan["scratch"], modality)

"""Property-based tests over params: any configuration runs, or stops with one clear line.

Hypothesis generates configurations three ways, from cheap to costly:

1. mutations of the project's params.yaml (a key set to any value, an unknown key added, a
   key removed, a section replaced) and arbitrary YAML text, through ``load_params`` /
   ``parse_params``: a valid ``Params``, or one ``ParamsError`` line naming the key;
2. generated ``train_head`` sections through the real stage entry (``run_command`` with
   ``pipelines.stages.train_head``) on a tiny project's cached features;
3. a handful of generated ``finetune`` sections through the plan and fine-tuning stage entries.

In 2 and 3 the stage either finishes and writes its metrics, or exits with status 2 (bad
params or input) and one ``<stage>: error:`` line naming a generated key, or status 3
(training diverged) and one line naming the epoch and step; any other exception escapes the
stage as a traceback and fails the test. Examples are derandomized: the same
configurations every run, so CI failures reproduce.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tlflax.config import Params, ParamsError, _printable, load_params, parse_params

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
LEAVES = [("experiment",)] + [
    (section, key) for section, values in BASE.items() if isinstance(values, dict) for key in values
]

# Values of every YAML type, with the edges that break numeric code: 0, negatives, huge
# numbers, NaN and infinities, empty and odd strings.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
KEY_NAME = st.from_regex(r"[a-z_]{1,14}", fullmatch=True)


def _is_one_line_naming(message: str, *names: str) -> bool:
    return (
        message.startswith("params.yaml: ")
        and "\n" not in message
        and any(name in message for name in names)
    )


@st.composite
def mutated_params(draw) -> tuple[dict, str, tuple[str, ...]]:
    raw = copy.deepcopy(BASE)
    path = draw(st.sampled_from(LEAVES))
    kind = draw(st.sampled_from(["set", "add", "remove", "replace_section"]))
    if kind == "set":
        target = raw if len(path) == 1 else raw[path[0]]
        target[path[-1]] = draw(ANY_VALUE)
    elif kind == "add":
        section = raw.get(path[0]) if len(path) == 2 else raw
        new_key = draw(KEY_NAME.filter(lambda key: key not in section))
        section[new_key] = draw(ANY_VALUE)
        path = (*path[:-1], new_key)
    elif kind == "remove":
        target = raw if len(path) == 1 else raw[path[0]]
        del target[path[-1]]
    else:
        raw[path[0]] = draw(ANY_VALUE)
        path = path[:1]
    return raw, kind, path


@settings(max_examples=300, deadline=None, derandomize=True)
@given(mutated_params())
def test_any_mutation_of_params_parses_or_names_the_key(mutation) -> None:
    raw, kind, path = mutation
    try:
        params = parse_params(raw)
    except ParamsError as error:
        message = str(error)
        # A removed key falls back to its default; what it then conflicts with is named.
        names = path if kind != "remove" else (path[0],)
        assert _is_one_line_naming(message, *names), (kind, path, message)
    else:
        assert isinstance(params, Params)


JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from([*BASE, "extra"]), JSON_LIKE, max_size=4) | JSON_LIKE)
def test_any_structure_parses_or_stops_with_one_line(raw) -> None:
    try:
        parse_params(raw)
    except ParamsError as error:
        # A mapping is wrong in one of its sections (or one is unknown): the line names
        # it; anything else is wrong as a whole, and the line says what it got instead.
        # (Shown with control characters escaped, to keep the line one line.)
        names = [f"'{_printable(key)}" for key in raw] if isinstance(raw, dict) else ["got "]
        assert _is_one_line_naming(str(error), *names), (raw, str(error))


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text(max_size=200))
def test_any_file_content_loads_or_stops_with_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_params(path)
    except ParamsError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message


# ----------------------------------------------------------------- through the stage entry


@pytest.fixture(scope="module")
def stage_project(small_project: Path, tmp_path_factory) -> Path:
    """A private copy of the built small project: the stages below overwrite its outputs."""
    from tests.small_project import copy_project

    return copy_project(small_project, tmp_path_factory.mktemp("properties") / "project")


def _run_stage(project: Path, stage: str, sections: dict, capsys, monkeypatch) -> int:
    """Run ``stage``'s entry in this process on ``project`` with ``sections`` merged into
    its params; returns the exit status. An exception other than the stage's own exit
    escapes: that is the raw traceback the property forbids.

    A stop must say what to change: bad params (status 2) name one of the generated keys
    (nothing else differs from the project's valid params), a diverged training (status 3)
    the epoch and step where the loss stopped being finite."""
    import importlib

    from pipelines.stages.common import run_command
    from tests.conftest import _merge

    params = _merge(yaml.safe_load((project / "params.yaml").read_text()), sections)
    params_file = project / "generated.yaml"
    params_file.write_text(yaml.safe_dump(params))
    body = importlib.import_module(f"pipelines.stages.{stage}").run
    monkeypatch.chdir(project)
    capsys.readouterr()
    try:
        run_command(stage, str(params_file), body)
    except SystemExit as stop:
        status = stop.code
        errors = capsys.readouterr().err.strip().splitlines()
        assert status in (2, 3), (status, errors)
        assert errors and errors[-1].startswith(f"{stage}: error: "), errors
        message = errors[-1]
        if status == 2:
            keys = [f"'{name}.{key}" for name, section in sections.items() for key in section]
            assert any(key in message for key in keys), (keys, message)
        else:
            assert re.search(r"epoch \d+", message) and re.search(r"step \d+", message), message
        return status
    return 0


def _finite_positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


TRAIN_HEAD = st.fixed_dictionaries(
    {},
    optional={
        "head": st.sampled_from(["linear", "mlp", "transformer"]),
        "hidden_dim": st.integers(min_value=-1, max_value=48),
        "dropout": st.sampled_from([0.0, 0.5, 0.99, 1.0, -0.1]),
        "learning_rate": st.sampled_from([1e-30, 1e-3, 0.1, 10.0, 1e30, math.inf, 0.0, -1.0]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 1e3, -1.0]),
        "batch_size": st.sampled_from([1, 7, 60, 1000, 10**13, 0]),
        "max_epochs": st.integers(min_value=0, max_value=3),
        "patience": st.integers(min_value=0, max_value=3),
        "seed": st.integers(min_value=-1, max_value=2**32),
    },
)


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(section=TRAIN_HEAD)
@pytest.mark.slow
def test_any_train_head_section_trains_or_stops_with_one_line(
    stage_project: Path, section: dict, capsys, monkeypatch
) -> None:
    metrics = stage_project / "metrics/vision/train_head.json"
    metrics.unlink(missing_ok=True)
    status = _run_stage(stage_project, "train_head", {"train_head": section}, capsys, monkeypatch)
    if status == 0:
        assert 0.0 <= json.loads(metrics.read_text())["validation_accuracy"] <= 1.0


RULES = st.sampled_from(
    [
        [{"pattern": "^head/"}, {"pattern": "^backbone/", "lr_multiplier": 0.5}],
        [{"pattern": "^head/"}, {"pattern": "^backbone/", "freeze": True}],
        [{"pattern": ".*", "freeze": True}],
        [{"pattern": "^head/"}],
        [{"pattern": "^backbone/blocks/[01]/", "freeze": True}, {"pattern": ".*"}],
    ]
)
FINETUNE = st.fixed_dictionaries(
    {"epochs": st.integers(min_value=1, max_value=2)},
    optional={
        "learning_rate": st.sampled_from([1e-4, 1e-2, 1e30]),
        "batch_size": st.sampled_from([7, 20, 60]),
        "warmup_fraction": st.sampled_from([0.0, 0.5]),
        "layer_lr_decay": st.sampled_from([0.5, 1.0]),
        "gradual_unfreezing": st.booleans(),
        "batchnorm": st.sampled_from(["frozen", "train"]),
        "monitor": st.sampled_from(["validation_loss", "validation_accuracy", "accuracy"]),
        "keep_best_checkpoints": st.integers(min_value=1, max_value=2),
        "augment": st.fixed_dictionaries({"random_crop": st.booleans(), "flip": st.booleans()}),
        "cache_frozen_prefix": st.booleans(),
        "rules": RULES,
    },
)


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(section=FINETUNE)
@pytest.mark.slow
def test_any_finetune_section_trains_or_stops_with_one_line(
    stage_project: Path, section: dict, capsys, monkeypatch
) -> None:
    metrics = stage_project / "metrics/vision/finetune.json"
    metrics.unlink(missing_ok=True)
    sections = {"finetune": section}
    # finetune takes every setting from the plan, so the plan stage must see the section.
    status = _run_stage(stage_project, "plan", sections, capsys, monkeypatch)
    if status == 0:
        status = _run_stage(stage_project, "finetune", sections, capsys, monkeypatch)
    if status == 0:
        summary = json.loads(metrics.read_text())
        assert summary["epochs_run"] <= section["epochs"]
        assert _finite_positive(float(summary["validation_loss"]))
    shutil.rmtree(stage_project / ".cache/resume", ignore_errors=True)

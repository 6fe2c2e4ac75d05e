"""The ablations command: rows, the choice on validation, and a real run on a tiny project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.ablations import (
    ABLATIONS_FILE,
    format_table,
    kept_levers,
    load_rows,
    merge_earlier_rows,
    override,
    paired_validation_gain,
    summarize_row,
)
from pipelines.flows import PipelineError
from tests.conftest import RAW_FASHION_MNIST, ROOT, make_project_copy, run
from tests.small_project import SMALL_PARAMS
from tests.test_seeds import RUN_TIMEOUT_SECONDS, dvc, dvc_site_cache  # noqa: F401


def test_the_projects_rows_set_known_params_of_each_job() -> None:
    from tlflax.config import parse_params

    for job in ("vision", "text", "audio"):
        pipeline, rows = load_rows(ROOT / ABLATIONS_FILE, job)
        params_file = ROOT / Path(pipeline).parent / "params.yaml"
        params = yaml.safe_load(params_file.read_text())
        assert rows["reference"] == {}
        for name, settings in rows.items():
            changed = json.loads(json.dumps(params))
            for key, value in settings.items():
                section = changed
                *parents, leaf = key.split(".")
                for part in parents:
                    section = section.setdefault(part, {})
                assert leaf in section or parents[-1] == "augment", (name, key)
                section[leaf] = value
            parse_params(changed, f"{params_file} + row {name}")  # a typo would stop here


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text: {rows: {reference: {}}}\n", "no job 'vision'"),
        ("vision: {rows: {fast: {finetune.epochs: 1}}}\n", "needs a 'reference' row"),
        ("vision: {rows: {reference: {}, bad: [1]}}\n", "vision.rows.bad: give a mapping"),
    ],
)
def test_a_malformed_file_is_named_with_what_to_change(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "ablations.yaml"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        load_rows(path, "vision")


def test_overrides_are_yaml_values_dvc_reads_back() -> None:
    assert override("finetune.label_smoothing", 0.1) == "finetune.label_smoothing=0.1"
    assert override("finetune.augment.test_time_flip", True) == (
        "finetune.augment.test_time_flip=true"
    )
    assert override("extract.taps", [3, 7]) == "extract.taps=[3, 7]"
    assert yaml.safe_load(override("a", None).split("=", 1)[1]) is None


def test_a_lever_is_kept_on_validation_never_on_test() -> None:
    def row(validation, test):
        runs = {
            seed: {"validation_accuracy": v, "test": {"finetune": t, "baseline": 0.8}}
            for seed, (v, t) in enumerate(zip(validation, test, strict=True))
        }
        return summarize_row({}, runs)

    rows = {
        "reference": row([0.90, 0.92], [0.86, 0.86]),
        # Better on test, worse on validation: not kept.
        "lucky_on_test": row([0.89, 0.92], [0.90, 0.90]),
        "better": row([0.91, 0.93], [0.85, 0.85]),
        # Ahead on the mean (+0.5 points) from gains of +3 and -2: inside the noise.
        "noisy": row([0.93, 0.90], [0.87, 0.87]),
    }
    assert kept_levers(rows) == ["better"]
    assert paired_validation_gain(rows["noisy"], rows["reference"]) == pytest.approx((0.005, 0.025))
    # One seed has no spread: any gain keeps the lever.
    single = {name: {**r, "runs": {"0": r["runs"]["0"]}} for name, r in rows.items()}
    assert kept_levers(single) == ["better", "noisy"]
    reference = rows["reference"]
    assert reference["validation_accuracy_mean"] == pytest.approx(0.91)
    assert reference["validation_accuracy_std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert reference["test"]["finetune"]["accuracy_mean"] == pytest.approx(0.86)
    table = format_table(
        {"seeds": [0, 1], "reference": "reference", "rows": rows, "kept": ["better"]}
    )
    assert "| better | (params file) | 0.9200 ± 0.0141 | 0.8500 ± 0.0000 | yes |" in table
    assert "| lucky_on_test |" in table and table.count("| no |") == 2


def test_earlier_rows_are_kept_only_beside_the_same_reference() -> None:
    def row(validation):
        runs = {
            seed: {"validation_accuracy": v, "test": {"finetune": v - 0.02}}
            for seed, v in enumerate(validation)
        }
        return summarize_row({}, runs)

    earlier = json.loads(
        json.dumps(
            {
                "seeds": [0, 1],
                "rows": {"reference": row([0.90, 0.92]), "old_lever": row([0.95, 0.95])},
            }
        )
    )
    new = {"seeds": [0, 1], "rows": {"reference": row([0.90, 0.92]), "new": row([0.80, 0.80])}}
    merged, dropped = merge_earlier_rows(earlier, dict(new))
    assert dropped == [] and list(merged["rows"]) == ["reference", "new", "old_lever"]
    assert merged["kept"] == ["old_lever"]
    # The reference moved (other code): the earlier row is not comparable and is named.
    moved = {"seeds": [0, 1], "rows": {"reference": row([0.91, 0.92])}}
    merged, dropped = merge_earlier_rows(earlier, dict(moved))
    assert dropped == ["old_lever"] and list(merged["rows"]) == ["reference"]
    # Other seeds: dropped too.
    merged, dropped = merge_earlier_rows(earlier, {**new, "seeds": [0, 2]})
    assert dropped == ["old_lever"]


@pytest.mark.slow
def test_rows_run_under_every_seed_and_a_failed_row_keeps_the_finished_ones(
    tmp_path: Path,
    dvc_site_cache: None,  # noqa: F811
) -> None:
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    project = make_project_copy(tmp_path / "project", SMALL_PARAMS)
    rows = {
        "reference": {},
        "smoothed": {"finetune.label_smoothing": 0.3},
        "decayed": {"finetune.weight_decay": 0.01},
        # Refused by the params schema in the first stage it reaches: the run fails.
        "broken": {"finetune.learning_rate": -1.0},
    }
    (project / ABLATIONS_FILE).write_text(
        # In this order (not sorted): the decayed row follows the smoothed one, the broken last.
        yaml.safe_dump({"vision": {"pipeline": "dvc.yaml", "rows": rows}}, sort_keys=False)
    )
    for command in (["add", "-A"], ["commit", "-qm", "two rows"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command],
                       cwd=project, check=True, capture_output=True)  # fmt: skip
    dvc(project, "repro", "dvc.yaml")
    params_before = (project / "params.yaml").read_bytes()
    # One seed keeps it short; the statistics over seeds are checked on made-up figures above.
    command = [sys.executable, "-m", "pipelines.ablations", "--job", "vision", "--seeds", "0"]
    result = run(command, cwd=project, timeout=RUN_TIMEOUT_SECONDS)
    # The broken row ends the command with one line, after the rows before it were written.
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ablations: broken, seed 0" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("ablations: ")
    report = json.loads((project / "metrics/vision/ablations.json").read_text())
    assert sorted(report["rows"]) == ["decayed", "reference", "smoothed"]
    assert report["rows"]["smoothed"]["set"] == {"finetune.label_smoothing": 0.3}
    for row in report["rows"].values():
        assert set(row["runs"]) == {"0"}
        assert {"finetune", "baseline", "head_only"} <= set(row["test"])
    # The smoothed row really trained with smoothing: its runs differ from the reference's.
    assert report["rows"]["smoothed"]["runs"] != report["rows"]["reference"]["runs"]
    # One seed: a lever is kept on any validation gain (no spread to weigh it against).
    reference_accuracy = report["rows"]["reference"]["validation_accuracy_mean"]
    assert report["kept"] == [
        name
        for name in ("smoothed", "decayed")
        if report["rows"][name]["validation_accuracy_mean"] > reference_accuracy
    ]
    # Each row runs with its own settings alone, never with those of the rows before it.
    decayed_run = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=project, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    decayed_ref = next(ref for ref in decayed_run if ref.endswith("/vision-decayed-seed0"))
    decayed_params = yaml.safe_load(
        subprocess.run(["git", "show", f"{decayed_ref}:params.yaml"],
                       cwd=project, check=True, capture_output=True, text=True).stdout
    )  # fmt: skip
    original = yaml.safe_load(params_before)
    assert decayed_params["finetune"]["weight_decay"] == 0.01
    assert decayed_params["finetune"].get("label_smoothing") == original["finetune"].get(
        "label_smoothing"
    )
    assert "| smoothed | `finetune.label_smoothing: 0.3` |" in format_table(report)
    assert (project / "params.yaml").read_bytes() == params_before
    assert "Data and pipelines are up to date." in dvc(project, "status", "dvc.yaml")

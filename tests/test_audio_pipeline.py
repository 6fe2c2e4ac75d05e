"""The audio job end to end under DVC, on a few real voice prompts per language."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import RAW_ASTERISK, ROOT, _merge, make_project_copy, run

AUDIO_PARAMS = "experiments/audio/params.yaml"
LANGUAGES = ("en", "es", "fr", "it", "ru")
CLIPS_PER_LANGUAGE = 24
TINY_AUDIO_PARAMS = {
    "prepare": {"train_per_class": 6, "validation_per_class": 4, "test_fraction": 0.25},
    "validate": {"min_examples_per_class": 3, "max_split_kl_divergence": 5.0},
    "extract": {"batch_size": 32},
    "train_head": {"max_epochs": 20, "patience": 5},
    "finetune": {"epochs": 2, "patience": 2},
    "evaluate": {"batch_size": 32},
}


def _copy_some_prompts(destination: Path) -> None:
    """The first clips of every language (sorted, the silences left out as the dataset
    does): a real, small spoken_language folder."""
    for language in LANGUAGES:
        clips = sorted(
            path
            for path in (RAW_ASTERISK / language).rglob("*.wav")
            if "silence" not in path.parts and path.stat().st_size > 4000
        )[:CLIPS_PER_LANGUAGE]
        for clip in clips:
            target = destination / language / clip.relative_to(RAW_ASTERISK / language)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(clip, target)


@pytest.fixture(scope="module")
def tiny_audio_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not RAW_ASTERISK.exists():
        pytest.fail(f"{RAW_ASTERISK} is missing: run `make assets` (scripts/fetch_assets.sh)")
    project = make_project_copy(tmp_path_factory.mktemp("audio_project"), {})
    _copy_some_prompts(project / "data/raw/asterisk")
    params = yaml.safe_load((ROOT / AUDIO_PARAMS).read_text())
    (project / AUDIO_PARAMS).write_text(
        yaml.safe_dump(_merge(params, TINY_AUDIO_PARAMS), sort_keys=False)
    )
    return project


@pytest.mark.slow
def test_audio_pipeline_runs_under_dvc(tiny_audio_project: Path) -> None:
    project = tiny_audio_project
    repro = run(
        [sys.executable, "-m", "dvc", "repro", "experiments/audio/dvc.yaml"], project, timeout=1200
    )
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    validation = json.loads((project / "metrics/audio/validate.json").read_text())
    assert validation["success"] and validation["num_critical_failures"] == 0
    metrics = json.loads((project / "metrics/audio/evaluate.json").read_text())
    assert metrics["n_train"] == 6 * len(LANGUAGES)
    assert metrics["n_test"] == 6 * len(LANGUAGES)  # a quarter of 24 clips per language
    assert set(metrics) >= {"baseline", "head_only", "finetune", "scratch"}
    for model in ("baseline", "head_only", "finetune", "scratch"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
    # 30 prompts through the frozen music network and a new head beat guessing (0.2).
    assert metrics["head_only"]["accuracy"] > 0.3, metrics
    # The audio job's head is the ridge fit (train_head.head: ridge): one closed-form "epoch".
    head = json.loads((project / "metrics/audio/train_head.json").read_text())
    assert head["epochs_run"] == 1 and head["best_epoch"] == 0, head
    advice = json.loads((project / "metrics/audio/advice.json").read_text())
    assert advice["strategy"] in {"feature_extraction", "top_k", "full", "scratch"}
    # The export stage wrote both graphs, the waveform in (the front end inside them).
    export = json.loads((project / "models/audio/export/export.json").read_text())
    assert (export["modality"], export["class_names"]) == ("audio", sorted(LANGUAGES))
    assert export["inputs"] == [{"name": "audio", "shape": ["batch", 48000], "dtype": "float32"}]
    assert {"model.onnx", "model.stablehlo"} <= set(export["files"])
    # The vision pipeline at the root is untouched by the audio run.
    assert not (project / "metrics/vision").exists()

    clip = next((project / "data/raw/asterisk/fr").rglob("*.wav")).relative_to(project)
    predict = run(
        [sys.executable, "-m", "pipelines.predict", "--params", AUDIO_PARAMS, str(clip)],
        project,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr
    label, probability, echoed = predict.stdout.strip().split("\t")
    assert label in LANGUAGES and 0.2 <= float(probability) <= 1.0 and echoed == str(clip)

    again = run(
        [sys.executable, "-m", "dvc", "repro", "experiments/audio/dvc.yaml"], project, timeout=300
    )
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


@pytest.mark.slow
def test_head_probe_compares_heads_and_poolings_on_real_prompts(tmp_path: Path) -> None:
    """`python -m pipelines.head_probe`: both heads, both moments of musicnn's pooling, per
    seed, on a real (small) spoken_language folder; nothing written but its output."""
    prompts = tmp_path / "asterisk"
    _copy_some_prompts(prompts)
    params = _merge(yaml.safe_load((ROOT / AUDIO_PARAMS).read_text()), TINY_AUDIO_PARAMS)
    params["prepare"]["raw_dir"] = str(prompts)
    params_file, output = tmp_path / "params.yaml", tmp_path / "head_probe.json"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    probe = run(
        [
            sys.executable,
            "-m",
            "pipelines.head_probe",
            "--params",
            str(params_file),
            "--seeds",
            "0",
            "--taps",
            "2",
            "--output",
            str(output),
        ],
        ROOT,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert {(row["pooling"], row["head"]) for row in rows} == {
        (pooling, head) for pooling in ("pooled", "first half") for head in ("gradient", "ridge")
    }
    for row in rows:
        assert row["taps"] == [2] and len(row["validation_accuracy"]) == 1
        assert 0.0 <= row["test_accuracy"][0] <= 1.0
    ridge = next(r for r in rows if r["head"] == "ridge" and r["pooling"] == "pooled")
    # 30 training prompts, block 2 of the frozen music network: well above guessing (0.2).
    assert ridge["validation_accuracy"][0] > 0.4, rows
    assert "| [2] | pooled | ridge |" in probe.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "asterisk",
        "head_probe.json",
        "params.yaml",
    ]


def test_head_probe_settings_override_the_params_file_or_are_refused() -> None:
    """`--set section.key=value` as `dvc exp run -S` takes it; a malformed one, or a key
    the params schema does not know, stops the probe with one line and exit 2."""
    from pipelines.head_probe import with_settings

    raw = yaml.safe_load((ROOT / AUDIO_PARAMS).read_text())
    changed = with_settings(raw, ["prepare.clip_padding=repeat", "extract.batch_size=8"])
    assert (changed["prepare"]["clip_padding"], changed["extract"]["batch_size"]) == ("repeat", 8)
    assert raw["prepare"]["clip_padding"] == "zeros"  # the file's values are left as read
    for setting, message in (
        ("prepare.clip_padding", "expected section.key=value"),
        ("nowhere.key=1", "expected section.key=value"),
        ("prepare.clip_pading=repeat", "clip_pading"),
    ):
        probe = run(
            [sys.executable, "-m", "pipelines.head_probe", "--taps", "2", "--set", setting],
            ROOT,
            timeout=120,
        )
        assert probe.returncode == 2, probe.stderr[-2000:]
        assert probe.stderr.startswith("head_probe: error:") and message in probe.stderr
        assert "Traceback" not in probe.stderr

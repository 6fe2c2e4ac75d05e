"""The exported classifiers in DVC's model registry: declared under ``artifacts:`` of each
job's pipeline, and fetched by ``dvc artifacts get`` once a version is registered."""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parent.parent
# pipeline file -> the experiment it runs (the jobs whose models are exported).
EXPORTED_JOBS = {
    "dvc.yaml": "vision",
    "experiments/text/dvc.yaml": "text",
    "experiments/audio/dvc.yaml": "audio",
}


def _run(arguments: list[str], cwd: Path) -> str:
    environment = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(
        arguments, cwd=cwd, env=environment, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{' '.join(arguments)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_each_exported_job_declares_its_classifier_as_the_export_stage_output():
    with Repo(str(ROOT)) as repository:
        declared = repository.artifacts.read()
        outputs = {
            (os.path.relpath(out.stage.dvcfile.path, ROOT), out.stage.name): os.path.relpath(
                out.fs_path, ROOT
            )
            for out in repository.index.outs
        }
    for pipeline, experiment in EXPORTED_JOBS.items():
        artifact = declared[pipeline][f"{experiment}-classifier"]
        assert artifact.type == "model"
        assert experiment in artifact.labels and artifact.desc
        path = posixpath.normpath(posixpath.join(posixpath.dirname(pipeline), artifact.path))
        assert path == f"models/{experiment}/export"
        assert outputs[(pipeline, "export")] == path


@pytest.mark.slow
def test_dvc_artifacts_get_fetches_a_registered_version(tmp_path):
    """The project's own ``artifacts:`` block, in a small DVC repository whose stage writes
    the declared path: register a version (GTO's annotated git tag), push to a local remote,
    and fetch it from outside the repository."""
    project, remote = tmp_path / "project", tmp_path / "store"
    project.mkdir()
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "ci@example.invalid"],
        ["git", "config", "user.name", "ci"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "store", str(remote)],
    ):
        _run(command, project)
    (project / "params.yaml").write_text("experiment: demo\n")
    write_model = (
        "import pathlib; p = pathlib.Path('models/demo/export'); "
        "p.mkdir(parents=True, exist_ok=True); (p / 'model.onnx').write_text('weights')"
    )
    pipeline = {
        "stages": {
            "export": {"cmd": f'python -c "{write_model}"', "outs": ["models/${experiment}/export"]}
        },
        "artifacts": yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "repro", "-q"], project)
    _run([sys.executable, "-m", "dvc", "push", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "model"], project)
    _run([str(Path(sys.executable).parent / "gto"), "register", "demo-classifier"], project)

    _run(
        [
            sys.executable,
            "-m",
            "dvc",
            "artifacts",
            "get",
            str(project),
            "demo-classifier",
            "-o",
            "got",
        ],
        tmp_path,
    )
    assert (tmp_path / "got" / "model.onnx").read_text() == "weights"

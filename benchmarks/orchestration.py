"""Orchestration overhead: a no-op ``dvc repro`` of the whole pipeline, then the same no-op
through the Prefect flow.

    .venv/bin/python -m benchmarks.orchestration

Uses this repository when its pipeline is up to date (``dvc status`` clean), else a stand-in
project of the same shape whose stages are tiny scripts (``create_standin_project``; the
orchestration tests use it too). Prints a table and writes benchmarks/results/orchestration.json:

- ``dvc_noop_s``: ``dvc repro`` on the command line, median of a few runs.
- ``flow_noop_s``: the flow called in a process whose Prefect API is already up (what each run
  costs once a server, ``flow.serve`` or the ephemeral API is running), median.
- ``flow_overhead_s``: ``flow_noop_s - dvc_noop_s`` (target: under 3 s).
- Prefect's start-up, counted separately and in full: ``prefect_import_s``,
  ``prefect_api_start_s`` (the ephemeral API server) and ``flow_noop_cold_s``, the wall time
  of ``python -m pipelines.flows`` in a fresh process, the command the README gives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "orchestration.json"
REPEATS = 3
TARGET_OVERHEAD_S = 3.0

# --- The stand-in project ---------------------------------------------------------------------

# One script plays every stage: small deterministic files where the real stages write theirs,
# the same exit statuses (1: validation failed, 2: bad params), and one line per run in
# stage-runs.log (git-ignored) so a test can count what really ran.
STANDIN_STAGE_SCRIPT = '''\
"""A stand-in stage: tiny deterministic outputs laid out like the real stage's."""

import json
import pathlib
import sys

import yaml

STAGE = sys.argv[1]
PARAMS = yaml.safe_load(pathlib.Path("params.yaml").read_text())
EXPERIMENT = PARAMS["experiment"]
CLASSES = ("cat", "dog")


def read(template):
    return json.loads(pathlib.Path(template.format(e=EXPERIMENT)).read_text())


def write(template, value):
    path = pathlib.Path(template.format(e=EXPERIMENT))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=1))
    return str(path)


with open("stage-runs.log", "a") as log:
    log.write(STAGE + "\\n")

if STAGE == "prepare":
    write("data/{e}/dataset.json", list(range(PARAMS["prepare"]["size"])))
elif STAGE == "validate":
    success = not PARAMS["validate"]["fail"]
    index = write("reports/{e}/data_docs/local_site/index.html", "<html>stand-in docs</html>")
    check = {"name": "balance.train.class_ratio", "severity": "critical", "passed": success,
             "observed": 1.0 if success else 9.0, "threshold": 1.5}
    write("metrics/{e}/validate.json", {
        "success": success, "num_checks": 1, "num_critical_failures": int(not success),
        "num_warnings": 0, "data_docs_index": index, "checks": [check]})
    sys.exit(0 if success else 1)
elif STAGE == "extract":
    scale = PARAMS["extract"]["scale"]
    write("data/{e}/features.json", [x * scale for x in read("data/{e}/dataset.json")])
elif STAGE == "train_head":
    rate = PARAMS["train_head"]["learning_rate"]
    if rate <= 0:
        print("train_head: error: train_head.learning_rate must be > 0", file=sys.stderr)
        sys.exit(2)
    write("models/{e}/head.json", {"learning_rate": rate,
                                   "features": sum(read("data/{e}/features.json"))})
elif STAGE == "finetune":
    write("models/{e}/finetune.json", {"head": read("models/{e}/head.json"),
                                       "learning_rate": PARAMS["finetune"]["learning_rate"]})
elif STAGE == "evaluate":
    rate = read("models/{e}/finetune.json")["head"]["learning_rate"]
    scores = {"head_only": 0.5 + rate, "finetune": 0.6 + rate}
    write("metrics/{e}/evaluate.json", {
        **{model: {"accuracy": round(score, 4), "macro_f1": round(score - 0.05, 4)}
           for model, score in scores.items()},
        "n_train": 60, "n_test": 20})
    write("plots/{e}/classification_report.json", {
        model: {"per_class": {name: {"precision": round(score, 4), "recall": round(score, 4),
                                     "f1": round(score, 4), "support": 10}
                              for name in CLASSES}}
        for model, score in scores.items()})
    write("plots/{e}/confusion.csv", "actual,predicted\\ncat,cat\\ndog,cat\\ndog,dog\\n")
'''

STANDIN_PARAMS = {
    "experiment": "standin",
    "prepare": {"size": 4},
    "validate": {"fail": False},
    "extract": {"scale": 2},
    "train_head": {"learning_rate": 0.1},
    "finetune": {"learning_rate": 0.01},
    "evaluate": {"batch_size": 8},
}


def _standin_stage(name: str, deps: list[str], **declarations: list) -> dict:
    return {
        "cmd": f"python standin_stage.py {name}",
        "deps": ["standin_stage.py", *deps],
        "params": [name],
        **{kind: entries for kind, entries in declarations.items() if entries},
    }


def _standin_pipeline() -> dict:
    """dvc.yaml of the stand-in: the real pipeline's stages, paths and kinds of outputs."""
    dataset, features = "data/${experiment}/dataset.json", "data/${experiment}/features.json"
    head, finetuned = "models/${experiment}/head.json", "models/${experiment}/finetune.json"
    validation = "metrics/${experiment}/validate.json"
    untracked = {"cache": False}
    stages = {
        "prepare": _standin_stage("prepare", [], outs=[dataset]),
        "validate": _standin_stage(
            "validate",
            [dataset],
            outs=[{"reports/${experiment}/data_docs": untracked}],
            metrics=[{validation: untracked}],
        ),
        "extract": _standin_stage("extract", [dataset, validation], outs=[features]),
        "train_head": _standin_stage("train_head", [features], outs=[head]),
        "finetune": _standin_stage("finetune", [head], outs=[finetuned]),
        "evaluate": _standin_stage(
            "evaluate",
            [finetuned],
            outs=[{"plots/${experiment}/classification_report.json": untracked}],
            metrics=[{"metrics/${experiment}/evaluate.json": untracked}],
            plots=[
                {
                    "plots/${experiment}/confusion.csv": {
                        "template": "confusion",
                        "x": "predicted",
                        "y": "actual",
                        **untracked,
                    }
                }
            ],
        ),
    }
    stages["prepare"]["params"] = ["experiment", "prepare"]
    return {"stages": stages}


def git(project: Path, *arguments: str) -> str:
    """Run git in ``project``; returns its output."""
    return subprocess.run(
        ["git", *arguments], cwd=project, check=True, capture_output=True, text=True
    ).stdout


def create_standin_project(directory: Path) -> Path:
    """A committed git + DVC project in ``directory`` shaped like the real pipeline.

    Its six stages (prepare ... evaluate) read ``params.yaml`` sections of the same names and
    write, in well under a second each, the files the real stages write, so orchestration can
    be exercised for real (``dvc repro``, ``dvc exp``, the flow) without the ML code.
    """
    from dvc.repo import Repo

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "standin_stage.py").write_text(STANDIN_STAGE_SCRIPT)
    (directory / "dvc.yaml").write_text(yaml.safe_dump(_standin_pipeline(), sort_keys=False))
    (directory / "params.yaml").write_text(yaml.safe_dump(STANDIN_PARAMS, sort_keys=False))
    (directory / ".gitignore").write_text("stage-runs.log\n/reports/*/dvc_plots/\n")
    git(directory, "init", "-q")
    # `dvc exp run` commits experiments: give the repository an identity of its own.
    git(directory, "config", "user.name", "tlflax")
    git(directory, "config", "user.email", "tlflax@example.invalid")
    # `Repo.init` logs a banner meant for the command line; keep it out of test and bench output.
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)
    try:
        with Repo.init(directory) as repository, repository.config.edit() as config:
            config["core"]["analytics"] = False
    finally:
        dvc_logger.setLevel(level)
    git(directory, "add", "-A")
    git(directory, "commit", "-qm", "stand-in pipeline")
    return directory


# --- Measurements -----------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    # Stage commands call `python`: make it this interpreter.
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    return environment


def _timed_command(command: list[str], project: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=project, env=_environment(), capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout + result.stderr


def _is_up_to_date(project: Path) -> bool:
    """Whether ``project`` has a dvc.lock and ``dvc status`` reports nothing stale."""
    from dvc.repo import Repo

    if not (project / "dvc.lock").is_file():
        return False
    try:
        with contextlib.chdir(project), Repo(project) as repository:
            return not repository.status()
    except Exception as error:  # any DVC failure means "not usable as is", never a crash
        print(f"this repository's pipeline cannot be checked ({error}); using the stand-in")
        return False


def measure_dvc_noop(project: Path) -> list[float]:
    """Wall times of ``dvc repro`` on the command line; each must be a no-op."""
    times = []
    for _ in range(REPEATS):
        elapsed, output = _timed_command([sys.executable, "-m", "dvc", "repro"], project)
        if "Running stage" in output:
            raise RuntimeError(f"`dvc repro` was not a no-op:\n{output}")
        times.append(elapsed)
    return times


def measure_cold_flow(project: Path) -> float:
    """Wall time of ``python -m pipelines.flows`` in a fresh process (imports, API, flow)."""
    command = [sys.executable, "-m", "pipelines.flows", "--project-dir", str(project)]
    elapsed, output = _timed_command(command, ROOT)
    if "ran no stage" not in output:
        raise RuntimeError(f"the flow was not a no-op:\n{output}")
    return elapsed


def measure_flow_in_process(project: Path) -> dict[str, float | list[float]]:
    """Import time, the first call (starts the ephemeral API) and warm no-op calls."""
    start = time.perf_counter()
    from pipelines.flows import pipeline  # timed here: this import is Prefect's and DVC's

    import_s = time.perf_counter() - start
    calls = []
    for _ in range(REPEATS + 1):
        start = time.perf_counter()
        result = pipeline(project_dir=str(project))
        calls.append(time.perf_counter() - start)
        if result["stages_run"]:
            raise RuntimeError(f"the flow was not a no-op: it ran {result['stages_run']}")
    return {"import_s": import_s, "first_call_s": calls[0], "warm_calls_s": calls[1:]}


def _table(rows: list[tuple[str, float, str]]) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'measure'.ljust(width)}  {'seconds':>8}  note", "-" * (width + 40)]
    lines += [f"{name.ljust(width)}  {value:8.2f}  {note}" for name, value, note in rows]
    return "\n".join(lines)


def main() -> None:
    # Offline, quiet, and the project's own Prefect home, whichever directory this runs from.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with tempfile.TemporaryDirectory(prefix="tlflax-orchestration-") as scratch:
        if _is_up_to_date(ROOT):
            project, source = ROOT, "this repository (dvc status clean)"
        else:
            project = create_standin_project(Path(scratch) / "standin")
            _timed_command([sys.executable, "-m", "dvc", "repro"], project)
            source = "stand-in project (this repository's pipeline is not up to date)"
        print(f"project: {source}\n")

        dvc_times = measure_dvc_noop(project)
        cold_s = measure_cold_flow(project)
        in_process = measure_flow_in_process(project)

    dvc_noop_s = statistics.median(dvc_times)
    flow_noop_s = statistics.median(in_process["warm_calls_s"])
    api_start_s = in_process["first_call_s"] - flow_noop_s
    results = {
        "project": "real" if project == ROOT else "stand-in",
        "dvc_noop_s": round(dvc_noop_s, 3),
        "flow_noop_s": round(flow_noop_s, 3),
        "flow_overhead_s": round(flow_noop_s - dvc_noop_s, 3),
        "target_overhead_s": TARGET_OVERHEAD_S,
        "meets_target": flow_noop_s - dvc_noop_s < TARGET_OVERHEAD_S,
        "prefect_import_s": round(in_process["import_s"], 3),
        "prefect_api_start_s": round(api_start_s, 3),
        "flow_noop_cold_s": round(cold_s, 3),
        "flow_cold_overhead_s": round(cold_s - dvc_noop_s, 3),
        "dvc_noop_runs_s": [round(value, 3) for value in dvc_times],
        "flow_noop_runs_s": [round(value, 3) for value in in_process["warm_calls_s"]],
    }
    print(
        _table(
            [
                ("dvc_noop_s", dvc_noop_s, f"`dvc repro`, median of {REPEATS}"),
                ("flow_noop_s", flow_noop_s, f"flow, Prefect API up, median of {REPEATS}"),
                ("flow_overhead_s", results["flow_overhead_s"], f"target < {TARGET_OVERHEAD_S}"),
                ("prefect_import_s", in_process["import_s"], "import Prefect + DVC + flow"),
                ("prefect_api_start_s", api_start_s, "ephemeral API server start"),
                ("flow_noop_cold_s", cold_s, "`python -m pipelines.flows`, fresh process"),
                ("flow_cold_overhead_s", results["flow_cold_overhead_s"], "cold minus dvc"),
            ]
        )
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

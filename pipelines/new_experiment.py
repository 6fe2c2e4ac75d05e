"""A new experiment in one command: its params.yaml and its dvc.yaml, from shared templates.

    python -m pipelines.new_experiment flowers --dataset image_folder --raw-dir data/raw/flowers
    python -m pipelines.new_experiment reviews --dataset text_file --raw-dir data/raw/reviews.csv \\
        --set prepare.test_fraction=0.2 --set prepare.label_column=sentiment
    dvc repro experiments/flowers/dvc.yaml

writes ``experiments/<name>/params.yaml`` - the job of the data's modality as the template
(``params.yaml`` for images, ``experiments/text/params.yaml`` for text,
``experiments/audio/params.yaml`` for audio: every key, with its comment), with the experiment's name, the source and each ``--set key=value`` - and
``experiments/<name>/dvc.yaml``, rendered from the project's ``dvc.yaml``: the same stages,
run from the repository root, reading the new params file (``--no-scratch`` leaves out the
from-scratch reference, as the text job does). The project's own jobs' ``dvc.yaml`` (text,
audio, longtail, drums) are rendered from the same template (``python -m
pipelines.new_experiment --render-jobs`` writes them; a test checks that they are up to
date), so every experiment has one pipeline.

The params are validated (tlflax/config.py) before anything is written: a wrong key, value
or an existing experiment stops with one line naming it, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import sys
from pathlib import Path

import yaml

from pipelines.stage_deps import pipeline_yaml
from pipelines.stages.common import EXIT_BAD_INPUT
from tlflax.config import DATASET_MODALITY, ParamsError, ValidateParams, parse_params

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PIPELINE = Path("dvc.yaml")
TEMPLATE_PARAMS = {
    "image": Path("params.yaml"),
    "text": Path("experiments/text/params.yaml"),
    "audio": Path("experiments/audio/params.yaml"),
}
# The project's own jobs beside the default one: folder -> whether it trains the
# from-scratch reference (the text job does not: MiniLM from random weights on 4000 reviews
# costs more CPU than it tells).
RENDERED_JOBS = {
    Path("experiments/text"): {"scratch": False},
    Path("experiments/audio"): {"scratch": True},
    # The README's worked examples: the long tail of issue "Imbalanced data" and the drum
    # hits made as a user makes an experiment (kept in step with the template all the same).
    Path("experiments/longtail"): {"scratch": False},
    Path("experiments/drums"): {"scratch": True},
    # Ten reviews a class, SetFit's few-shot regime (issue "Transfer that pays").
    Path("experiments/text_few_shot"): {"scratch": False},
}
EXPERIMENTS = Path("experiments")
# validate keys the schema accepts for audio data only (tlflax.config refuses them elsewhere).
AUDIO_ONLY_THRESHOLDS = ("max_silent_fraction", "max_clipped_fraction")
# The stage a job may leave out: the from-scratch reference (costly for a text encoder).
SCRATCH_STAGE = "train_scratch"


def _dump(document) -> str:
    buffer = io.StringIO()
    pipeline_yaml().dump(document, buffer)
    return buffer.getvalue()


def _output_paths(stage) -> list[str]:
    """Every path a stage writes: its outs, metrics and plots."""
    entries = [entry for key in ("outs", "metrics", "plots") for entry in stage.get(key, [])]
    return [str(next(iter(entry))) if isinstance(entry, dict) else str(entry) for entry in entries]


def _written_by(path: str, outputs: list[str]) -> bool:
    return any(path == output or path.startswith(output.rstrip("/") + "/") for output in outputs)


def render_pipeline(experiment_dir: Path, *, scratch: bool) -> str:
    """The project's ``dvc.yaml`` as the pipeline of ``experiment_dir`` (relative to the
    repository root): each stage runs from the root (``wdir``) on that folder's params.yaml,
    and its params entries name that file.

    ``scratch``: keep the from-scratch reference (left out, it takes the dependencies on its
    outputs and the artifacts it writes with it).
    Artifact paths become relative to the folder.
    """
    handler = pipeline_yaml()
    pipeline = handler.load((ROOT / TEMPLATE_PIPELINE).read_text(encoding="utf-8"))
    params_file = (experiment_dir / "params.yaml").as_posix()
    wdir = "/".join(".." for _ in experiment_dir.parts)
    stages = pipeline["stages"]
    left_out = [] if scratch else [SCRATCH_STAGE]
    gone = [path for name in left_out for path in _output_paths(stages.pop(name))]
    for name in list(stages):
        stage = stages[name]
        rendered = type(stage)()
        rendered["wdir"] = wdir
        for key, value in stage.items():
            if key == "cmd":
                value = f"{value} --params {params_file}"
            elif key == "params":
                keys = copy.deepcopy(value)
                value = type(value)([{params_file: keys}])
            elif key == "deps":
                value = type(value)(entry for entry in value if not _written_by(str(entry), gone))
            rendered[key] = value
        # The comments ride on the mappings and lists they annotate: all carried over.
        stages[name] = rendered
    artifacts = pipeline.get("artifacts") or {}
    for name in list(artifacts):
        if _written_by(str(artifacts[name]["path"]), gone):
            del artifacts[name]
        else:
            artifacts[name]["path"] = f"{wdir}/{artifacts[name]['path']}"
    if "artifacts" in pipeline and not artifacts:
        del pipeline["artifacts"]
    header = (
        f"# The experiment in {experiment_dir.as_posix()}/, rendered from ../../dvc.yaml by\n"
        "# python -m pipelines.new_experiment (edit the template, not this file): the same stage\n"
        "# scripts, run from the repository root (wdir) on this folder's params.yaml.\n"
        f"#   dvc repro {experiment_dir.as_posix()}/dvc.yaml\n"
        f"#   dvc exp run {experiment_dir.as_posix()}/dvc.yaml -S {params_file}:finetune.epochs=3\n"
    )
    return header + _dump(pipeline)


def _set_key(document, key: str, value) -> None:
    """Set a dotted ``key`` of a ruamel document (sections created as needed)."""
    *sections, leaf = key.split(".")
    node = document
    for section in sections:
        if section not in node or node[section] is None:
            node[section] = {}
        node = node[section]
    node[leaf] = value


def render_params(name: str, dataset: str, raw_dir: str, settings: list[tuple[str, object]]) -> str:
    """The new experiment's params.yaml: the template of the data's modality, with these
    values set (comments of the template kept).

    Raises:
      ParamsError: a key or value the schema refuses, naming it.
    """
    from ruamel.yaml.comments import CommentedMap

    # A named source says its modality; a TFDS catalog dataset is told with prepare.modality
    # (the schema refuses it without one, whichever template is taken).
    modality = dict(settings).get("prepare.modality") or DATASET_MODALITY.get(dataset)
    template = TEMPLATE_PARAMS.get(modality, TEMPLATE_PARAMS["image"])  # refused below if bad
    document = pipeline_yaml().load((ROOT / template).read_text(encoding="utf-8"))
    # The template's header, its data's sizes and its validation thresholds are its own
    # data's: the new data starts from all of its examples and the schema's thresholds.
    document.ca.comment = None
    document["experiment"] = name
    document["prepare"] = CommentedMap(
        dataset=dataset,
        raw_dir=raw_dir,
        train_per_class=None,
        train_fraction=1.0,
        validation_per_class=None,
        validation_fraction=0.1,
        deduplicate=True,
        seed=0,
    )
    document["prepare"].yaml_set_start_comment(
        "All examples of the source; validation is 10% of each class of its training\n"
        "split. A source without a test split needs prepare.test_fraction.",
        indent=2,
    )
    thresholds = ValidateParams().model_dump(exclude_none=True)
    if modality != "audio":  # the silence and clipping checks are audio's alone
        for key in AUDIO_ONLY_THRESHOLDS:
            thresholds.pop(key)
    document["validate"] = CommentedMap(thresholds)
    for key in ("prepare", "validate"):  # the template's comments on its own data
        document.ca.items.pop(key, None)
    document.yaml_set_comment_before_after_key(
        "validate", before="\nThe data gate (Great Expectations): the schema's thresholds."
    )
    document.yaml_set_comment_before_after_key("baseline", before="\nThe classical reference.")
    for key, value in settings:
        _set_key(document, key, value)
    text = _dump(document)
    parse_params(yaml.safe_load(text), f"experiments/{name}/params.yaml")
    return (
        f"# Experiment {name}: written by python -m pipelines.new_experiment from {template.as_posix()}\n"
        "# (same schema, tlflax/config.py; edit freely). Run it from the repository root:\n"
        f"#   dvc repro experiments/{name}/dvc.yaml\n{text}"
    )


def parse_setting(text: str) -> tuple[str, object]:
    key, separator, value = text.partition("=")
    if not separator or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key):
        raise ParamsError(f"--set {text!r}: give section.key=value, e.g. finetune.epochs=3")
    return key, yaml.safe_load(value)


def create_experiment(
    name: str, dataset: str, raw_dir: str, settings: list[tuple[str, object]], *, scratch: bool
) -> Path:
    """Write ``experiments/<name>/{params,dvc}.yaml``; returns the folder.

    Raises:
      ParamsError: a bad name, setting or value, or the experiment exists (nothing written).
    """
    reserved = [job.name for job in RENDERED_JOBS]
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or name in reserved:
        raise ParamsError(
            f"experiment name {name!r}: use lowercase letters, digits, '-' and '_', starting "
            f"with a letter (not {' or '.join(map(repr, reserved))}: the project's own jobs)"
        )
    folder = EXPERIMENTS / name
    if (ROOT / folder).exists():
        raise ParamsError(f"{folder}: already exists; choose another name or remove it")
    params = render_params(name, dataset, raw_dir, settings)
    pipeline = render_pipeline(folder, scratch=scratch)
    (ROOT / folder).mkdir(parents=True)
    (ROOT / folder / "params.yaml").write_text(params, encoding="utf-8")
    (ROOT / folder / "dvc.yaml").write_text(pipeline, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.new_experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "name", nargs="?", help="the experiment's name (its folder under experiments/)"
    )
    parser.add_argument(
        "--dataset", help="prepare.dataset: image_folder, text_file, tfds:<name>, ..."
    )
    parser.add_argument("--raw-dir", help="prepare.raw_dir: the folder or file of the data")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any params key"
    )
    parser.add_argument("--no-scratch", action="store_true", help="no from-scratch reference stage")
    parser.add_argument(
        "--render-jobs",
        action="store_true",
        help="rewrite the dvc.yaml of " + ", ".join(job.as_posix() for job in RENDERED_JOBS),
    )
    arguments = parser.parse_args(argv)
    if arguments.render_jobs:
        for job, stages in RENDERED_JOBS.items():
            (ROOT / job / "dvc.yaml").write_text(render_pipeline(job, **stages), encoding="utf-8")
            print(f"new_experiment: wrote {job.as_posix()}/dvc.yaml")
        return
    if not (arguments.name and arguments.dataset and arguments.raw_dir):
        parser.error("give NAME, --dataset and --raw-dir")
    try:
        settings = [parse_setting(text) for text in arguments.set]
        folder = create_experiment(
            arguments.name,
            arguments.dataset,
            arguments.raw_dir,
            settings,
            scratch=not arguments.no_scratch,
        )
    except ParamsError as error:
        print(f"new_experiment: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(
        f"new_experiment: wrote {folder}/params.yaml and {folder}/dvc.yaml; run: dvc repro {folder}/dvc.yaml"
    )


if __name__ == "__main__":
    main()

"""A new experiment in one command: rendered files, bad input, and two real end-to-end runs
(an image folder and a CSV of texts) through `dvc repro` of the written pipeline."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.new_experiment import RENDERED_JOBS, render_pipeline
from tests.conftest import RAW_FASHION_MNIST, ROOT, make_project_copy, run
from tests.test_seeds import dvc, dvc_site_cache  # noqa: F401
from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from tlflax.data.fine_foods import read_fine_foods

RAW_MODELDATA = ROOT / "data/raw/modeldata"
COMMAND = [sys.executable, "-m", "pipelines.new_experiment"]
# Small enough for seconds per stage; the validation gate sized for a handful per class.
SMALL_RUN = [
    "--set", "validate.min_examples_per_class=2",
    "--set", "validate.max_class_ratio=3.0",
    "--set", "validate.max_split_kl_divergence=5.0",
    "--set", "validate.max_label_kl_divergence=1.0",
    "--set", "validate.max_feature_mean_shift=10.0",
    "--set", "finetune.epochs=1",
    "--set", "train_head.max_epochs=3",
]  # fmt: skip


@pytest.mark.parametrize("job", sorted(RENDERED_JOBS))
def test_the_projects_jobs_are_rendered_from_the_shared_template(job: Path) -> None:
    committed = (ROOT / job / "dvc.yaml").read_text(encoding="utf-8")
    assert committed == render_pipeline(job, **RENDERED_JOBS[job]), (
        f"{job}/dvc.yaml differs from dvc.yaml rendered: run "
        "python -m pipelines.new_experiment --render-jobs"
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    return make_project_copy(tmp_path_factory.mktemp("new-experiment") / "project", {})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["Shoes", "--dataset", "image_folder", "--raw-dir", "x"], "experiment name 'Shoes'"),
        (["text", "--dataset", "text_file", "--raw-dir", "x.csv"], "experiment name 'text'"),
        (["shoes", "--dataset", "image_folder", "--raw-dir", "x", "--set", "finetune.epoch=3"],
         "finetune.epoch"),
        (["shoes", "--dataset", "image_folder", "--raw-dir", "x", "--set", "epochs"],
         "give section.key=value"),
        (["shoes", "--dataset", "imagefolder", "--raw-dir", "x"], "prepare.dataset"),
    ],
)  # fmt: skip
def test_bad_input_stops_with_one_line_and_writes_nothing(
    project: Path, arguments: list[str], message: str
) -> None:
    before = sorted(path.name for path in (project / "experiments").iterdir())
    result = run([*COMMAND, *arguments], cwd=project, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("new_experiment: error: "), result.stderr
    assert message in lines[0]
    assert sorted(path.name for path in (project / "experiments").iterdir()) == before


def _image_folder(root: Path, per_class: dict[str, int], classes: int = 3) -> None:
    """Real Fashion-MNIST images as PNG files in root/<split>/<class>/."""
    raw = read_fashion_mnist(RAW_FASHION_MNIST)
    for split, count in per_class.items():
        images, labels = raw["train" if split == "train" else "test"]
        for label in range(classes):
            folder = root / split / FASHION_MNIST_CLASSES[label].replace("/", "-")
            folder.mkdir(parents=True)
            for index in np.flatnonzero(labels == label)[:count]:
                Image.fromarray(images[index, :, :, 0]).save(folder / f"{index}.png")


@pytest.mark.slow
def test_an_image_folder_experiment_runs_end_to_end(project: Path, dvc_site_cache: None) -> None:  # noqa: F811
    _image_folder(project / "data/raw/shoes", {"train": 24, "test": 8})
    result = run(
        [*COMMAND, "shoes", "--dataset", "image_folder", "--raw-dir", "data/raw/shoes",
         "--set", "extract.backbone=small_cnn", "--set", "extract.pretrained=false",
         "--set", "extract.image_size=32", "--set", "finetune.batch_size=8",
         "--set", "train_scratch.batch_size=8", *SMALL_RUN],
        cwd=project, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "experiments/shoes/dvc.yaml" in result.stdout
    params = yaml.safe_load((project / "experiments/shoes/params.yaml").read_text())
    assert params["experiment"] == "shoes"
    assert params["prepare"]["dataset"] == "image_folder"
    assert params["extract"]["backbone"] == "small_cnn"
    # Its pipeline is the project's, with the from-scratch reference.
    pipeline = yaml.safe_load((project / "experiments/shoes/dvc.yaml").read_text())
    template = yaml.safe_load((project / "dvc.yaml").read_text())
    assert list(pipeline["stages"]) == list(template["stages"])
    dvc(project, "repro", "experiments/shoes/dvc.yaml")
    evaluation = json.loads((project / "metrics/shoes/evaluate.json").read_text())
    assert {"baseline", "head_only", "finetune", "scratch"} <= set(evaluation)
    assert evaluation["n_test"] == 3 * 8
    assert "Data and pipelines are up to date." in dvc(
        project, "status", "experiments/shoes/dvc.yaml"
    )


@pytest.mark.slow
def test_a_csv_text_experiment_runs_end_to_end(project: Path, dvc_site_cache: None) -> None:  # noqa: F811
    if not RAW_MODELDATA.exists():
        pytest.fail(f"{RAW_MODELDATA} is missing: run `make assets` (scripts/fetch_assets.sh)")
    reviews = read_fine_foods(RAW_MODELDATA)["train"]
    path = project / "data/raw/reviews.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for label in ("great", "other"):
            for text in reviews[reviews["label"] == label]["review"][:40]:
                writer.writerow([text, label])
    result = run(
        [*COMMAND, "reviews", "--dataset", "text_file", "--raw-dir", "data/raw/reviews.csv",
         "--no-scratch", "--set", "prepare.test_fraction=0.25",
         "--set", "prepare.text_column=review", "--set", "prepare.label_column=sentiment",
         "--set", "extract.max_length=32", "--set", "finetune.batch_size=8", *SMALL_RUN],
        cwd=project, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pipeline = yaml.safe_load((project / "experiments/reviews/dvc.yaml").read_text())
    assert "train_scratch" not in pipeline["stages"]
    dvc(project, "repro", "experiments/reviews/dvc.yaml")
    evaluation = json.loads((project / "metrics/reviews/evaluate.json").read_text())
    assert {"baseline", "head_only", "finetune"} <= set(evaluation)
    assert "scratch" not in evaluation
    assert evaluation["n_test"] == 20  # a quarter of 40 per class

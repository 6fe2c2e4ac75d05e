"""`prepare.dataset` beyond the packaged datasets: image folders, CSV/JSONL files, tfds: names.

Each good source goes through the real `prepare` stage run by the real `dvc repro` in a
copy of the project (the image folder also through `validate`), and the TFDS dataset it
wrote is read back: splits, class names, counts per class. Bad params and bad sources stop
the stage with exit status 2 and one line naming the key or the file, writing nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml
from PIL import Image

from tests.conftest import make_project_copy, run
from tlflax.config import ParamsError, parse_params
from tlflax.data.catalog import read_tfds_catalog
from tlflax.data.tfds_store import read_class_names, read_image_split
from tlflax.data.tfds_text import read_text_split

TEXT_PARAMS = "experiments/text/params.yaml"
# Image-folder run: 3 classes x 8 images; test_fraction 0.25 holds out 2 per class, and the
# remaining 6 give 2 for validation and 4 for train.
IMAGE_PARAMS = {
    "experiment": "photos",
    "prepare": {
        "dataset": "image_folder",
        "raw_dir": "data/raw/photos",
        "image_size": 8,
        "test_fraction": 0.25,
        "train_per_class": 4,
        "validation_per_class": 2,
    },
    # Thresholds for 2-4 noise images per class.
    "validate": {"min_examples_per_class": 2, "max_split_kl_divergence": 1.0},
}
# Text runs: the text pipeline's params with subsets of a few reviews per class.
TEXT_SUBSETS = {
    "train_per_class": 4,
    "train_fraction": None,
    "validation_per_class": 2,
    "validation_fraction": None,
    "deduplicate": False,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One project copy for the module; each test names its own experiment and raw data."""
    return make_project_copy(tmp_path_factory.mktemp("sources"), IMAGE_PARAMS)


def _set_text_params(project: Path, experiment: str, prepare: dict) -> None:
    path = project / TEXT_PARAMS
    params = yaml.safe_load(path.read_text())
    params["experiment"] = experiment
    # Only the keys every source shares stay; the test gives the source's own.
    shared = ("seed",)
    params["prepare"] = {key: params["prepare"][key] for key in shared} | prepare
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _dvc_repro(project: Path, target: str) -> None:
    result = run([sys.executable, "-m", "dvc", "repro", target], cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def _reviews(count: int, label: str, first: int) -> list[dict[str, str]]:
    """Distinct short reviews: no duplicate or leak for validation to find."""
    return [{"review": f"{label} review number {first + n}", "score": label} for n in range(count)]


# ---------------------------------------------------------------- params


def test_every_source_has_a_modality_and_a_safe_stored_name() -> None:
    sources = {
        "fashion_mnist": ({}, "image", "fashion_mnist"),
        "image_folder": ({"raw_dir": "photos"}, "image", "image_folder"),
        "text_file": ({"raw_dir": "reviews.csv"}, "text", "text_file"),
        "tfds:imdb_reviews/plain_text:1.0.0": (
            {"raw_dir": "tfds", "modality": "text"},
            "text",
            "tfds_imdb_reviews_plain_text_1_0_0",
        ),
    }
    for dataset, (keys, modality, stored_name) in sources.items():
        prepare = parse_params({"prepare": {"dataset": dataset, **keys}}).prepare
        assert (prepare.modality, prepare.stored_name) == (modality, stored_name), dataset


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ({"dataset": "image_folder"}, "dataset 'image_folder' needs 'raw_dir'"),
        ({"dataset": "tfds:beans", "raw_dir": "tfds"}, "dataset 'tfds:beans' needs 'modality'"),
        ({"image_size": 32}, "'image_size' does not apply to dataset 'fashion_mnist'"),
        ({"dataset": "text_file", "raw_dir": "a.csv", "channels": 1}, "'channels' does not"),
        ({"dataset": "image_folder", "raw_dir": "photos", "modality": "image"}, "'modality'"),
        (
            {"dataset": "tfds:imdb_reviews", "raw_dir": "tfds", "modality": "text", "channels": 1},
            "'channels' does not apply to dataset 'tfds:imdb_reviews' (text data)",
        ),
        (
            {"dataset": "tfds:beans", "raw_dir": "tfds", "modality": "image", "test_fraction": 0.2},
            "give exactly one of test_split and test_fraction",
        ),
        ({"dataset": "text_file", "raw_dir": "a.csv", "classes": ["x"]}, "'prepare.classes'"),
        ({"dataset": "text_file", "raw_dir": "a.csv", "classes": ["x", "x"]}, "'x' more than"),
        ({"dataset": "text_file", "raw_dir": "a.csv", "test_fraction": 1.0}, "test_fraction"),
        ({"dataset": "image_folder", "raw_dir": "photos", "image_size": 4}, "image_size"),
    ],
)
def test_bad_source_params_name_the_key(prepare: dict, message: str) -> None:
    with pytest.raises(ParamsError) as raised:
        parse_params({"prepare": prepare})
    assert message in str(raised.value)
    assert "more problem" not in str(raised.value)


# ---------------------------------------------------------------- good sources


@pytest.mark.slow
def test_image_folder_through_prepare_and_validate(project: Path) -> None:
    generator = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        for position in range(8):
            # Two sizes: image_size resizes every image to one shape.
            size = (10, 12) if position % 2 else (9, 9)
            pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
            path = project / "data/raw/photos" / name / f"{position}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)

    _dvc_repro(project, "validate")

    data_dir = project / "data/photos/tfds"
    assert read_class_names(data_dir, "image_folder") == ["cat", "dog", "fox"]
    sizes = {"train": 4, "validation": 2, "test": 2}
    split_images = []
    for split, per_class in sizes.items():
        images, labels = read_image_split(data_dir, "image_folder", split)
        assert images.shape == (3 * per_class, 8, 8, 3), split
        assert _counts(labels, 3) == [per_class] * 3, split
        split_images.append(images.reshape(len(images), -1))
    # The three splits are disjoint.
    rows = np.concatenate(split_images)
    assert len(np.unique(rows, axis=0)) == len(rows)
    report = json.loads((project / "metrics/photos/validate.json").read_text())
    assert report["success"], report
    assert "validate:" in (project / "dvc.lock").read_text()


@pytest.mark.slow
def test_csv_file_with_explicit_classes_holds_out_test(project: Path) -> None:
    rows = _reviews(8, "great", 0) + _reviews(8, "other", 100)
    lines = ["review,score"] + [f'"{row["review"]}",{row["score"]}' for row in rows]
    (project / "data/raw/reviews.csv").write_text("\n".join(lines) + "\n")
    _set_text_params(
        project,
        "reviews_csv",
        {
            "dataset": "text_file",
            "raw_dir": "data/raw/reviews.csv",
            "text_column": "review",
            "label_column": "score",
            # Label ids follow this order, not the sorted one.
            "classes": ["other", "great"],
            "test_fraction": 0.25,
            **TEXT_SUBSETS,
        },
    )

    _dvc_repro(project, "experiments/text/dvc.yaml:prepare")

    data_dir = project / "data/reviews_csv/tfds"
    assert read_class_names(data_dir, "text_file") == ["other", "great"]
    for split, per_class in {"train": 4, "validation": 2, "test": 2}.items():
        texts, labels = read_text_split(data_dir, "text_file", split)
        assert _counts(labels, 2) == [per_class, per_class], split
        for text, label in zip(texts, labels, strict=True):
            assert text.startswith(["other", "great"][label])


@pytest.mark.slow
def test_jsonl_files_per_split(project: Path) -> None:
    folder = project / "data/raw/reviews_jsonl"
    folder.mkdir(parents=True)
    for split, count, first in (("train", 7, 0), ("test", 3, 500)):
        rows = _reviews(count, "bad", first) + _reviews(count, "good", first + 50)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _set_text_params(
        project,
        "reviews_jsonl",
        {
            "dataset": "text_file",
            "raw_dir": "data/raw/reviews_jsonl",
            "text_column": "review",
            "label_column": "score",
            **TEXT_SUBSETS,
        },
    )

    _dvc_repro(project, "experiments/text/dvc.yaml:prepare")

    data_dir = project / "data/reviews_jsonl/tfds"
    assert read_class_names(data_dir, "text_file") == ["bad", "good"]
    for split, per_class in {"train": 4, "validation": 2, "test": 3}.items():
        _, labels = read_text_split(data_dir, "text_file", split)
        assert _counts(labels, 2) == [per_class, per_class], split
    # test is the file's whole test split, in file order.
    test_texts, _ = read_text_split(data_dir, "text_file", "test")
    assert test_texts[0] == "bad review number 500"


class TlflaxSourcesTestReviews(tfds.core.GeneratorBasedBuilder):
    """A catalog-registered text builder that generates its reviews locally: no download."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None  # no checksums file to look for (see tlflax.data.catalog)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "review": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["great", "other"]),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("review", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12)}

    def _generate_examples(self, count: int):
        for position in range(count):
            yield position, {"review": f"review {position}", "label": position % 2}


@pytest.mark.slow
def test_prepared_tfds_catalog_copy_without_download(project: Path) -> None:
    # Prepared here, where the builder is registered; the stage's own process knows only
    # the files, as with a prepared copy brought from a machine with a network.
    read_tfds_catalog(
        "tlflax_sources_test_reviews",
        project / "data/raw/tfds",
        splits={"train": "train"},
        download=True,
    )
    _set_text_params(
        project,
        "catalog",
        {
            "dataset": "tfds:tlflax_sources_test_reviews",
            "raw_dir": "data/raw/tfds",
            "modality": "text",
            # The builder has no test split: hold one out of train.
            "test_split": None,
            "test_fraction": 0.25,
            **TEXT_SUBSETS,
            "train_per_class": 2,
            "validation_per_class": 1,
        },
    )

    _dvc_repro(project, "experiments/text/dvc.yaml:prepare")

    # Stored under a filesystem-safe name derived from the catalog name.
    data_dir = project / "data/catalog/tfds"
    assert [path.name for path in data_dir.iterdir()] == ["tfds_tlflax_sources_test_reviews"]
    name = "tfds_tlflax_sources_test_reviews"
    assert read_class_names(data_dir, name) == ["great", "other"]
    for split, per_class in {"train": 2, "validation": 1, "test": 2}.items():
        _, labels = read_text_split(data_dir, name, split)
        assert _counts(labels, 2) == [per_class, per_class], split


# ---------------------------------------------------------------- bad params and sources


def _bad_reviews_csv(project: Path) -> None:
    (project / "data/raw/bad_reviews.csv").write_text("review,score\nlovely,great\nmeh,other\n")


def _empty_tfds_dir(project: Path) -> None:
    (project / "data/raw/empty_tfds").mkdir(exist_ok=True)


TEXT_SOURCE = {"dataset": "text_file", "raw_dir": "data/raw/bad_reviews.csv", "test_fraction": 0.5}


# case -> (prepare params, what to create first, the message's start, what it goes on to say)
BAD_SOURCES = {
    "text_column_not_in_file": (
        {**TEXT_SOURCE, "text_column": "body", "label_column": "score"},
        _bad_reviews_csv,
        "prepare: error: data/raw/bad_reviews.csv: has no column 'body'",
        "columns present: ['review', 'score']",
    ),
    "unknown_source_name": (
        {**TEXT_SOURCE, "dataset": "text_files"},
        None,
        "prepare: error: experiments/text/params.yaml: 'prepare.dataset': unknown dataset",
        "did you mean 'text_file'?",
    ),
    "tfds_name_with_bad_characters": (
        {"dataset": "tfds:../imdb reviews", "raw_dir": "data/raw/empty_tfds", "modality": "text"},
        None,
        "prepare: error: experiments/text/params.yaml: 'prepare.dataset': 'tfds:../imdb reviews'",
        "is not a TFDS catalog name",
    ),
    "tfds_not_prepared_and_no_download": (
        {"dataset": "tfds:imdb_reviews", "raw_dir": "data/raw/empty_tfds", "modality": "text"},
        _empty_tfds_dir,
        "prepare: error: tfds:imdb_reviews: not prepared in data/raw/empty_tfds",
        "prepare.download is false",
    ),
    "tfds_modality_mismatch": (
        {"dataset": "tfds:mnist", "raw_dir": "data/raw/empty_tfds", "modality": "text"},
        _empty_tfds_dir,
        "prepare: error: prepare.modality: is 'text' but tfds:mnist holds image data",
        "set prepare.modality: image",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_stops_prepare_with_one_line(project: Path, case: str) -> None:
    prepare, create, start, detail = BAD_SOURCES[case]
    if create:
        create(project)
    _set_text_params(project, "bad_source", prepare)

    result = run(
        [sys.executable, "-m", "pipelines.stages.prepare", "--params", TEXT_PARAMS],
        cwd=project,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(start) and detail in line, line
    assert not (project / "data/bad_source").exists()

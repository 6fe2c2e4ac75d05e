"""Users' own data and TFDS catalog names, and the bad-data matrix of issue 4.

Every fixture is built in tmp_path with Pillow and numpy: small PNG/JPEG/GIF/BMP files in
class folders, CSV and JSONL files, tiny TFDS builders. Unreadable input must stop the
reader with a DataError naming the file or record; a readable dataset with a quality
problem (imbalance, leakage) must fail the real Great Expectations validation naming the
check and the records; and a refused rebuild must leave the dataset already built intact.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tlflax.data.catalog import read_tfds_catalog
from tlflax.data.errors import DataError
from tlflax.data.image_folder import read_image_folder, read_image_folder_splits
from tlflax.data.manifest import image_manifest
from tlflax.data.text_file import read_text_file, read_text_file_splits
from tlflax.data.tfds_store import read_class_names, read_image_split, write_image_dataset
from tlflax.data.tfds_text import read_text_split, write_text_dataset
from tlflax.validation import ValidationSummary, ValidationThresholds, validate_manifest

IMAGE_SIZE = 8
# Thresholds for splits of a few images per class; representativeness of noise images
# only warns (the default severity), so each failure below comes from the case tested.
THRESHOLDS = ValidationThresholds(
    expected_classes=["cat", "dog"],
    max_class_ratio=2.0,
    min_examples_per_class=3,
    max_duplicate_fraction=0.0,
    max_split_kl_divergence=0.5,
)


def _save(path: Path, image: Image.Image, image_format: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, image_format)
    return path


def _noise_image(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _class_folders(folder: Path, counts: dict[str, int], first_seed: int) -> None:
    """``counts[name]`` distinct noise PNGs in ``folder/<name>/``, named img_000.png, ..."""
    seed = first_seed
    for name, count in counts.items():
        for position in range(count):
            _save(folder / name / f"img_{position:03d}.png", _noise_image(seed))
            seed += 1


def _split_folder(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    _class_folders(root / "train", train, first_seed=0)
    _class_folders(root / "test", test, first_seed=1000)
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds none: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _validate(splits, class_names, docs_dir: Path) -> ValidationSummary:
    return validate_manifest(image_manifest(splits, class_names), THRESHOLDS, docs_dir=docs_dir)


def _check(summary: ValidationSummary, name: str):
    (check,) = [check for check in summary.checks if check.name == name]
    return check


# ---------------------------------------------------------------- image folders


def test_image_folder_converts_every_mode_to_one_shape(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    gray, red_cmyk = 77, (0, 255, 255, 0)
    _save(root / "cat" / "a_rgb.png", _noise_image(0, (12, 9)))
    _save(root / "cat" / "b_gray.png", Image.new("L", (5, 5), gray))
    _save(root / "cat" / "c_cmyk.jpg", Image.new("CMYK", (8, 8), red_cmyk), "JPEG")
    _save(root / "cat" / "d_gray16.png", Image.fromarray(np.full((8, 8), 0x8000, np.uint16)))
    _save(root / "dog" / "a_palette.gif", Image.new("L", (8, 8), gray).convert("P"), "GIF")
    _save(root / "dog" / "b_transparent.png", Image.new("RGBA", (8, 8), (1, 2, 3, 0)))
    _save(root / "dog" / "c_bilevel.bmp", Image.new("1", (8, 8), 1), "BMP")
    (root / "dog" / "d_link.png").symlink_to("../cat/a_rgb.png")  # a link inside root is fine
    (root / "cat" / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are skipped

    images, labels, class_names = read_image_folder(root, image_size=IMAGE_SIZE)
    assert class_names == ["cat", "dog"]
    assert images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert np.all(images[1] == gray)  # grayscale repeated into R, G and B
    np.testing.assert_allclose(images[2], np.broadcast_to([255, 0, 0], images[2].shape), atol=3)
    assert np.all(images[3] == 0x80)  # 16-bit scaled to 8 bits
    assert np.all(images[4] == gray)  # palette looked up
    assert np.all(images[5] == 255)  # transparent -> white
    assert np.all(images[6] == 255)  # bilevel 1 -> 255
    np.testing.assert_array_equal(images[7], images[0])

    gray_images, _, _ = read_image_folder(root, image_size=IMAGE_SIZE, channels=1)
    assert gray_images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert abs(int(gray_images[2].mean()) - 76) <= 2  # luma of pure red

    with pytest.raises(DataError, match="set image_size") as raised:
        read_image_folder(root)  # sizes differ and nothing resizes them
    assert "b_gray.png" in str(raised.value)


# A good split folder: train 6 + 6, test 3 + 3 distinct images.
GOOD_TRAIN, GOOD_TEST = {"cat": 6, "dog": 6}, {"cat": 3, "dog": 3}


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A good image-folder dataset already written as TFDS, as a previous `prepare` left it."""
    root = _split_folder(tmp_path_factory.mktemp("good"), GOOD_TRAIN, GOOD_TEST)
    splits, class_names = read_image_folder_splits(root, image_size=IMAGE_SIZE)
    data_dir = tmp_path_factory.mktemp("data")
    write_image_dataset(data_dir, "user_images", splits, class_names)
    return data_dir, splits


def _outside_file(tmp_path: Path) -> Path:
    return _save(tmp_path / "outside" / "secret.png", _noise_image(99))


def _dotdot_to_outside_file(tmp_path: Path) -> str:
    _outside_file(tmp_path)
    return "../../../outside/secret.png"  # relative to source/train/cat/


Damage = Callable[[Path, Path], None]  # (dataset root, tmp_path)


def _write(relative: str, content: bytes | Callable[[Path], bytes]) -> Damage:
    def damage(root: Path, tmp_path: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content(tmp_path))

    return damage


def _link(relative: str, target: Callable[[Path], Path | str]) -> Damage:
    def damage(root: Path, tmp_path: Path) -> None:
        (root / relative).symlink_to(target(tmp_path))

    return damage


def _remove(*relatives: str, keep: str | None = None) -> Damage:
    """Delete folders, re-creating ``keep`` empty."""

    def damage(root: Path, tmp_path: Path) -> None:
        for relative in relatives:
            shutil.rmtree(root / relative)
        if keep:
            (root / keep).mkdir()

    return damage


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# case -> (damage to a good split folder, the path the error names, the problem it states)
BAD_IMAGE_FOLDERS: dict[str, tuple[Damage, str, str]] = {
    "corrupt_image": (
        _write("train/cat/noise.png", bytes(range(256)) * 4),
        "train/cat/noise.png",
        "not a readable image",
    ),
    "truncated_image": (
        _write("train/cat/cut.png", _png_bytes(_noise_image(7, (64, 64)))[:300]),
        "train/cat/cut.png",
        "corrupt image",
    ),
    "zero_byte_file": (_write("train/dog/empty.png", b""), "train/dog/empty.png", "0 bytes"),
    "non_image_file": (
        _write("train/dog/notes.txt", b"labels"),
        "train/dog/notes.txt",
        "not an image file",
    ),
    "oversized_image": (
        _write("train/cat/huge.png", _png_header(9000, 8000)),
        "train/cat/huge.png",
        "9000 x 8000 = 72000000 pixels, over the limit",
    ),
    "pillow_bomb_guard": (
        _write("train/cat/bomb.png", _png_header(20000, 10000)),
        "train/cat/bomb.png",
        "Pillow's decompression-bomb guard",
    ),
    "symlink_outside_root": (
        _link("train/cat/linked.png", _outside_file),
        "train/cat/linked.png",
        "outside the dataset root",
    ),
    "dotdot_path_outside_root": (
        _link("train/cat/up.png", _dotdot_to_outside_file),
        "train/cat/up.png",
        "outside the dataset root",
    ),
    "class_folder_outside_root": (
        _link("train/bird", lambda tmp_path: _outside_file(tmp_path).parent),
        "train/bird",
        "outside the dataset root",
    ),
    "empty_class_folder": (
        _remove("train/dog", keep="train/dog"),
        "train/dog",
        "class folder is empty",
    ),
    "single_class": (
        _remove("train/dog", "test/dog"),
        "train",
        r"needs at least 2 class folders to classify, found \['cat'\]",
    ),
    "unknown_label": (
        _write("test/bird/img_000.png", lambda _: _png_bytes(_noise_image(5))),
        "test/bird",
        "class 'bird' of split 'test' is not a class of train",
    ),
    "empty_test_split": (_remove("test", keep="test"), "test", "holds no class folders"),
    "missing_test_split": (_remove("test"), ".", "required split 'test' is missing"),
    "misnamed_split": (
        _write("val/cat/img_000.png", lambda _: _png_bytes(_noise_image(6))),
        "val",
        r"is not a split \(expected \['train', 'test', 'validation'\]\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_FOLDERS))
def test_bad_image_folder_is_refused_and_built_dataset_kept(
    case: str, tmp_path: Path, built_dataset
) -> None:
    damage, named, problem = BAD_IMAGE_FOLDERS[case]
    root = _split_folder(tmp_path.resolve() / "source", GOOD_TRAIN, GOOD_TEST)
    damage(root, tmp_path)
    data_dir, built_splits = built_dataset

    # What `prepare` does: read, then write. The read must fail before anything is written.
    with pytest.raises(DataError) as raised:
        splits, class_names = read_image_folder_splits(root, image_size=IMAGE_SIZE)
        write_image_dataset(data_dir, "user_images", splits, class_names)
    location, _, message = str(raised.value).partition(": ")
    assert location == str(root / named)
    assert re.search(problem, message), message

    assert sorted(path.name for path in data_dir.iterdir()) == ["user_images"]
    assert read_class_names(data_dir, "user_images") == ["cat", "dog"]
    for split, (images, labels) in built_splits.items():
        read_images, read_labels = read_image_split(data_dir, "user_images", split)
        np.testing.assert_array_equal(read_images, images)
        np.testing.assert_array_equal(read_labels, labels)


def test_good_image_folder_passes_validation(tmp_path: Path) -> None:
    root = _split_folder(tmp_path / "source", GOOD_TRAIN, GOOD_TEST)
    _class_folders(root / "validation", {"cat": 3, "dog": 3}, first_seed=2000)
    splits, class_names = read_image_folder_splits(root, image_size=IMAGE_SIZE)
    assert list(splits) == ["train", "test", "validation"]
    summary = _validate(splits, class_names, tmp_path / "docs")
    assert summary.success, summary.format_report()


def test_heavy_imbalance_fails_validation_naming_the_class(tmp_path: Path) -> None:
    root = _split_folder(tmp_path / "source", {"cat": 30, "dog": 3}, GOOD_TEST)  # cat x10
    splits, class_names = read_image_folder_splits(root, image_size=IMAGE_SIZE)
    summary = _validate(splits, class_names, tmp_path / "docs")
    assert not summary.success
    ratio = _check(summary, "balance.train.class_ratio")
    assert not ratio.passed and ratio.severity == "critical"
    assert ratio.observed == {"ratio": 10.0, "largest": "cat", "smallest": "dog"}
    assert "balance.train.class_ratio" in summary.format_report()


def test_duplicate_leaked_across_splits_fails_validation_naming_records(tmp_path: Path) -> None:
    root = _split_folder(tmp_path / "source", GOOD_TRAIN, GOOD_TEST)
    # test/cat/leak.png sorts after img_000..002: test[3], a byte copy of train[2].
    shutil.copyfile(root / "train/cat/img_002.png", root / "test/cat/leak.png")
    splits, class_names = read_image_folder_splits(root, image_size=IMAGE_SIZE)
    summary = _validate(splits, class_names, tmp_path / "docs")
    assert not summary.success
    leakage = _check(summary, "leakage.test_vs_train")
    assert not leakage.passed and leakage.observed["leaked_records"] == 1
    assert "test[3] (same as train[2])" in summary.format_report()


# ---------------------------------------------------------------- text files

GOOD_CSV = 'text,label\nlovely tea,great\n"bitter, stale",other\nfine biscuits,great\n'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "reviews.csv",
            "text,label\nok,great\ncaf\xe9 au lait,other\n".encode("latin-1"),
            r"reviews.csv, line 3: byte b'\\xe9' at offset \d+ is not UTF-8",
        ),
        (
            "reviews.csv",
            b"review,score\nok,great\n",
            r"reviews.csv: has no column 'text'; columns present: \['review', 'score'\]",
        ),
        ("reviews.csv", b"text,label\nok,great\n  ,other\n", "line 3: empty text"),
        ("reviews.csv", b"text,label\nok,great\nnice,\n", "line 3: missing label"),
        ("reviews.csv", b"text,label\nok,great\nnice,meh\n", "line 3: unknown label 'meh'"),
        ("reviews.csv", b"text,label\nok,great\nyes, really,great\n", "line 3: row has 3 values"),
        ("reviews.csv", b"text,label\n", "holds no records"),
        (
            "reviews.jsonl",
            b'{"text": "ok", "label": "great"}\n{"text": "x", "label": "other"\n',
            "line 2: not valid JSON",
        ),
        (
            "reviews.jsonl",
            b'{"text": "ok", "label": "great"}\n{"body": "x", "label": "other"}\n',
            r"line 2: has no column 'text'; columns present: \['body', 'label'\]",
        ),
        ("reviews.tsv", b"text\tlabel\n", "unsupported file type"),
    ],
    ids=[
        "non_utf8",
        "missing_column",
        "empty_text",
        "missing_label",
        "unknown_label",
        "unquoted_comma",
        "no_records",
        "bad_json",
        "jsonl_missing_key",
        "unsupported_type",
    ],
)
def test_bad_text_file_names_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as raised:
        read_text_file(path, text_column="text", label_column="label", classes=["great", "other"])
    assert str(raised.value).startswith(str(path))


def test_text_splits_from_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("\ufeff" + GOOD_CSV, encoding="utf-8")  # with a BOM
    records = [{"text": "superb\u2028coffee", "label": "great"}, {"text": "meh", "label": "other"}]
    (tmp_path / "test.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    splits, class_names = read_text_file_splits(tmp_path, text_column="text", label_column="label")
    assert class_names == ["great", "other"]
    assert splits["train"][0] == ["lovely tea", "bitter, stale", "fine biscuits"]
    assert splits["train"][1].tolist() == [0, 1, 0]
    assert splits["test"][0][0] == "superb\u2028coffee" and splits["test"][1].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("test_file", "content", "message"),
    [
        ("test.csv", "text,label\ngood,neutral\n", "test.csv, line 2: unknown label 'neutral'"),
        ("test.csv", "text,label\n", "test.csv: holds no records"),
        (None, "", "required split 'test' is missing"),
        ("dev.csv", GOOD_CSV, "dev.csv: is not a split"),
    ],
    ids=["label_not_in_train", "empty_split", "missing_split", "unknown_split_file"],
)
def test_bad_text_splits_are_refused(
    tmp_path: Path, test_file: str | None, content: str, message: str
) -> None:
    (tmp_path / "train.csv").write_text(GOOD_CSV)
    if test_file:
        (tmp_path / test_file).write_text(content)
    with pytest.raises(DataError, match=message):
        read_text_file_splits(tmp_path, text_column="text", label_column="label")


def test_single_class_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\nok,great\nyes,great\n")
    with pytest.raises(DataError, match=r"needs at least 2 classes.*\['great'\]"):
        read_text_file(path, text_column="text", label_column="label")


def test_non_utf8_rebuild_keeps_built_text_dataset(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "train.csv").write_text(GOOD_CSV)
    (source / "test.csv").write_text(GOOD_CSV)
    columns = {"text_column": "text", "label_column": "label"}
    splits, class_names = read_text_file_splits(source, **columns)
    data_dir = tmp_path / "data"
    write_text_dataset(data_dir, "user_texts", splits, class_names)
    (source / "test.csv").write_bytes(b"text,label\nok,great\n\xff\xfe,other\n")
    with pytest.raises(DataError, match=r"test.csv, line 3: .* is not UTF-8"):
        splits_again, _ = read_text_file_splits(source, **columns)
        write_text_dataset(data_dir, "user_texts", splits_again, class_names)
    texts, labels = read_text_split(data_dir, "user_texts", "test")
    assert texts == splits["test"][0] and labels.tolist() == splits["test"][1].tolist()


# ---------------------------------------------------------------- TFDS catalog names


class TlflaxTestPhotos(tfds.core.GeneratorBasedBuilder):
    """A catalog-registered builder that generates PNGs of two sizes locally: no download."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # No checksums file to find (finding one imports importlib_resources, see catalog).
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10, 0), "test": self._generate_examples(4, 100)}

    def _generate_examples(self, count: int, first_seed: int):
        for position in range(count):
            size = (6, 9) if position % 2 else (12, 8)
            png = _png_bytes(_noise_image(first_seed + position, size))
            yield position, {"image": png, "label": position % 2}


class TlflaxTestReviews(TlflaxTestPhotos):
    """A text catalog builder: UTF-8 reviews with a ClassLabel."""

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

    def _generate_examples(self, count: int, first_seed: int):
        for position in range(count):
            yield position, {"review": f"café n°{first_seed + position}", "label": position % 2}


class TlflaxTestNeedsTensorflow(TlflaxTestPhotos):
    """Like the catalog builders that call TensorFlow while generating (cats_vs_dogs)."""

    def _generate_examples(self, count: int, first_seed: int):
        from tensorflow_datasets.core.utils.lazy_imports_utils import tensorflow

        yield 0, {"image": tensorflow.io.encode_png, "label": 0}


def test_catalog_name_offline_is_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DataError, match="tfds:cats_vs_dogs: not prepared.*needs a network"):
        read_tfds_catalog("cats_vs_dogs", tmp_path)
    with pytest.raises(DataError, match="tfds:cats_vs_dog: not in the TFDS catalog.*cats_vs_dogs"):
        read_tfds_catalog("cats_vs_dog", tmp_path)
    with pytest.raises(DataError, match="tfds:coco: its TFDS builder calls TensorFlow"):
        read_tfds_catalog("coco", tmp_path)
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


def test_catalog_download_without_network_fails_fast(tmp_path: Path) -> None:
    # TFDS needs importlib_resources to find the download URLs (the checksums file).
    pytest.importorskip("importlib_resources")
    started = time.monotonic()
    with pytest.raises(DataError, match="tfds:cats_vs_dogs: cannot reach download.microsoft.com"):
        read_tfds_catalog("cats_vs_dogs", tmp_path, download=True, connect_timeout_s=5)
    assert time.monotonic() - started < 30  # TFDS alone retries for ~3.5 minutes


def test_catalog_prepare_then_read_prepared_copy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tfds:tlflax_test_photos: not prepared"):
        read_tfds_catalog("tlflax_test_photos", tmp_path)
    prepared = read_tfds_catalog(
        "tlflax_test_photos", tmp_path, download=True, image_size=IMAGE_SIZE
    )
    assert prepared.modality == "image" and prepared.class_names == ["cat", "dog"]
    images, labels = prepared.splits["train"]
    assert images.shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3) and labels.shape == (10,)
    assert sorted(np.bincount(labels).tolist()) == [5, 5]

    # Already prepared in data_dir: read without downloading, with TFDS split slicing.
    sliced = read_tfds_catalog(
        "tlflax_test_photos",
        tmp_path,
        splits={"train": "train[:50%]", "test": "test"},
        image_size=IMAGE_SIZE,
        channels=1,
    )
    assert sliced.splits["train"][0].shape == (5, IMAGE_SIZE, IMAGE_SIZE, 1)
    # TFDS shuffles examples when preparing: which record differs first is not fixed.
    with pytest.raises(DataError, match=r"tlflax_test_photos test\[\d\].*set image_size"):
        read_tfds_catalog("tlflax_test_photos", tmp_path, splits={"test": "test"})
    with pytest.raises(DataError, match="tlflax_test_photos validation: cannot read this split"):
        read_tfds_catalog("tlflax_test_photos", tmp_path, splits={"validation": "validation"})

    # A copy stored as tfrecord (TFDS's default) cannot be read without TensorFlow.
    (info_path,) = tmp_path.glob("tlflax_test_photos/*/dataset_info.json")
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match="prepared in .* as tfrecord, which needs TensorFlow"):
        read_tfds_catalog("tlflax_test_photos", tmp_path)
    assert "tensorflow" not in sys.modules


def test_catalog_text_dataset(tmp_path: Path) -> None:
    reviews = read_tfds_catalog("tlflax_test_reviews", tmp_path, download=True)
    assert reviews.modality == "text" and reviews.class_names == ["great", "other"]
    texts, labels = reviews.splits["test"]
    assert sorted(texts) == [f"café n°{seed}" for seed in range(100, 104)]
    assert sorted(labels.tolist()) == [0, 0, 1, 1]


def test_catalog_builder_needing_tensorflow_is_named(tmp_path: Path) -> None:
    if "tensorflow" in sys.modules:
        pytest.skip("TensorFlow is installed here")
    with pytest.raises(DataError, match="calls TensorFlow while preparing"):
        read_tfds_catalog("tlflax_test_needs_tensorflow", tmp_path, download=True)

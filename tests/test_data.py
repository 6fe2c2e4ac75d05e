"""Tests of tlflax.data: idx reading, the TFDS store, subsets, the batch pipeline, manifests.

Everything runs on real components: the Fashion-MNIST files from `make assets`, real TFDS
builds in tmp_path, real JAX.
"""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tlflax.data.errors import DataError
from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_fashion_mnist
from tlflax.data.manifest import IMAGE_MANIFEST_SCHEMA, cross_split_matches, image_manifest
from tlflax.data.pipeline import (
    augment_images,
    cutmix_images,
    erase_random_rectangles,
    iterate_batches,
    num_batches,
    prepare_images,
)
from tlflax.data.subsets import split_train_validation, stratified_subset
from tlflax.data.tfds_store import read_class_names, read_image_split, write_image_dataset

RAW_DIR = Path(__file__).resolve().parents[1] / "data" / "raw" / "fashion-mnist"


# ---------------------------------------------------------------- Fashion-MNIST idx files


@pytest.fixture(scope="module")
def fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not RAW_DIR.is_dir():
        pytest.skip("Fashion-MNIST not fetched; run `make assets`")
    return read_fashion_mnist(RAW_DIR)


def test_read_fashion_mnist_shapes_and_class_counts(fashion_mnist) -> None:
    train_images, train_labels = fashion_mnist["train"]
    test_images, test_labels = fashion_mnist["test"]
    assert train_images.shape == (60_000, 28, 28, 1) and train_images.dtype == np.uint8
    assert test_images.shape == (10_000, 28, 28, 1)
    assert train_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


@pytest.fixture
def raw_copy(tmp_path: Path) -> Path:
    """A writable folder of the raw files (links: only the damaged file gets replaced)."""
    if not RAW_DIR.is_dir():
        pytest.skip("Fashion-MNIST not fetched; run `make assets`")
    for names in FASHION_MNIST_FILES.values():
        for name in names:
            (tmp_path / name).symlink_to(RAW_DIR / name)
    return tmp_path


def _replace(path: Path, content: bytes) -> None:
    path.unlink()
    path.write_bytes(content)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("zero_bytes", "truncated"),
        ("truncated_gzip", "not a readable gzip file"),
        ("wrong_magic", "wrong magic number"),
        ("short_payload", "header declares shape"),
        ("missing", "file not found"),
    ],
)
def test_damaged_idx_file_names_the_file(raw_copy: Path, damage: str, message: str) -> None:
    damaged = raw_copy / "t10k-labels-idx1-ubyte.gz"
    original = gzip.decompress((RAW_DIR / damaged.name).read_bytes())
    if damage == "zero_bytes":
        _replace(damaged, b"")
    elif damage == "truncated_gzip":
        _replace(damaged, (RAW_DIR / damaged.name).read_bytes()[:1000])
    elif damage == "wrong_magic":  # an image-file header where labels belong
        _replace(damaged, gzip.compress(b"\x00\x00\x08\x03" + original[4:]))
    elif damage == "short_payload":
        _replace(damaged, gzip.compress(original[:-10]))
    else:
        damaged.unlink()
    with pytest.raises(DataError, match=message) as raised:
        read_fashion_mnist(raw_copy)
    assert str(damaged) in str(raised.value)
    assert "make assets" in str(raised.value)


def test_data_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DataError("a.gz", "broken", "refetch")))
    assert (error.location, error.problem, error.hint) == ("a.gz", "broken", "refetch")
    assert str(error) == "a.gz: broken (refetch)"


# ---------------------------------------------------------------- TFDS store


@pytest.fixture(scope="module")
def digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits as uint8 NHWC: a small real image set."""
    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    return {"train": (images[:1500], labels[:1500]), "test": (images[1500:], labels[1500:])}


DIGIT_NAMES = [str(digit) for digit in range(10)]


def test_tfds_round_trip_is_exact(tmp_path: Path, digit_splits) -> None:
    written = write_image_dataset(tmp_path, "digits", digit_splits, DIGIT_NAMES, "sklearn digits")
    assert written == tmp_path / "digits"
    assert (written / "1.0.0" / "dataset_info.json").is_file()
    for split, (images, labels) in digit_splits.items():
        read_images, read_labels = read_image_split(tmp_path, "digits", split)
        np.testing.assert_array_equal(read_images, images)
        np.testing.assert_array_equal(read_labels, labels)
        assert read_images.dtype == np.uint8 and read_labels.dtype == np.int64
    assert read_class_names(tmp_path, "digits") == DIGIT_NAMES
    # TFDS must not need TensorFlow for any of this.
    assert "tensorflow" not in sys.modules


def test_tfds_round_trip_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    write_image_dataset(tmp_path, "rgb", {"train": (images, labels)}, ["r", "g", "b"])
    read_images, read_labels = read_image_split(tmp_path, "rgb", "train")
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


class _FailingImages(np.ndarray):
    """Images whose 6th row cannot be read: a build that dies half-way through."""

    def __getitem__(self, key):
        if isinstance(key, int | np.integer) and key >= 5:
            raise RuntimeError("simulated crash while writing")
        return super().__getitem__(key)


def test_failed_rebuild_keeps_existing_dataset(tmp_path: Path, digit_splits) -> None:
    write_image_dataset(tmp_path, "digits", digit_splits, DIGIT_NAMES)
    images, labels = digit_splits["train"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_image_dataset(
            tmp_path, "digits", {"train": (images.view(_FailingImages), labels)}, DIGIT_NAMES
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["digits"]  # no leftovers
    read_images, _ = read_image_split(tmp_path, "digits", "test")
    np.testing.assert_array_equal(read_images, digit_splits["test"][0])


def test_rebuild_replaces_dataset_and_clears_stale_builds(tmp_path: Path, digit_splits) -> None:
    write_image_dataset(tmp_path, "digits", digit_splits, DIGIT_NAMES)
    (tmp_path / ".digits.building-killed" / "digits").mkdir(parents=True)  # a SIGKILLed build
    smaller = {"train": (digit_splits["train"][0][:10], digit_splits["train"][1][:10])}
    write_image_dataset(tmp_path, "digits", smaller, DIGIT_NAMES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["digits"]
    assert len(read_image_split(tmp_path, "digits", "train")[1]) == 10
    with pytest.raises(DataError, match="no split 'test'"):
        read_image_split(tmp_path, "digits", "test")


_WRITE_TWICE = """
import sys
from pathlib import Path
import numpy as np
from tlflax.data.tfds_store import write_image_dataset
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
labels = np.arange(40) % 4
splits = {"train": (images, labels), "test": (images[:8], labels[:8])}
write_image_dataset(Path(sys.argv[1]), "tiny", splits, ["a", "b", "c", "d"])
"""


def test_the_same_records_write_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    # Protobuf seeds its map order per process, so only two processes can show a difference;
    # DVC hashes these files, and a byte change would re-run every stage after `prepare`.
    def written(folder: str) -> dict[str, bytes]:
        subprocess.run(
            [sys.executable, "-c", _WRITE_TWICE, str(tmp_path / folder)], check=True,
            capture_output=True,
        )  # fmt: skip
        root = tmp_path / folder / "tiny"
        return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}

    first, second = written("first"), written("second")
    assert any(name.endswith("array_record-00000-of-00001") for name in first)
    assert first == second


def test_tfds_store_rejects_bad_input(tmp_path: Path, digit_splits) -> None:
    images, labels = digit_splits["train"]
    with pytest.raises(DataError, match="split 'train'.*labels span"):
        write_image_dataset(tmp_path, "digits", {"train": (images, labels)}, ["0", "1"])
    with pytest.raises(DataError, match="snake_case"):
        write_image_dataset(tmp_path, "Digits!", digit_splits, DIGIT_NAMES)
    with pytest.raises(DataError, match="no TFDS dataset here"):
        read_image_split(tmp_path, "absent", "train")


# ---------------------------------------------------------------- subsets


LABELS = np.repeat(np.arange(4), [30, 40, 50, 60])


def test_stratified_subset_balanced_sorted_reproducible() -> None:
    subset = stratified_subset(LABELS, per_class=10, seed=3)
    assert np.bincount(LABELS[subset]).tolist() == [10, 10, 10, 10]
    assert np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, stratified_subset(LABELS, per_class=10, seed=3))
    assert not np.array_equal(subset, stratified_subset(LABELS, per_class=10, seed=4))


def test_stratified_subset_is_pinned_across_machines() -> None:
    # PCG64 streams are platform-independent: a change here means subsets changed.
    labels = np.repeat(np.arange(3), 10)
    assert stratified_subset(labels, per_class=2, seed=0).tolist() == [6, 7, 12, 13, 20, 29]


def test_stratified_subset_fraction_and_exclusion() -> None:
    subset = stratified_subset(LABELS, fraction=0.5, seed=0)
    assert np.bincount(LABELS[subset]).tolist() == [15, 20, 25, 30]
    excluded = np.arange(0, 150, 2)
    remaining = stratified_subset(LABELS, per_class=5, seed=0, exclude=excluded)
    assert not np.intersect1d(remaining, excluded).size


def test_stratified_subset_names_too_small_class() -> None:
    with pytest.raises(DataError, match=r"class 0: has 30 examples, 35 requested"):
        stratified_subset(LABELS, per_class=35, seed=0)
    with pytest.raises(DataError, match="exactly one"):
        stratified_subset(LABELS, per_class=3, fraction=0.1, seed=0)


def test_split_train_validation_disjoint_and_stable() -> None:
    train, validation = split_train_validation(
        LABELS, train_per_class=20, validation_per_class=5, seed=1
    )
    assert not np.intersect1d(train, validation).size
    assert np.bincount(LABELS[train]).tolist() == [20] * 4
    assert np.bincount(LABELS[validation]).tolist() == [5] * 4
    everything_else, same_validation = split_train_validation(
        LABELS, train_per_class=None, validation_per_class=5, seed=1
    )
    np.testing.assert_array_equal(same_validation, validation)
    assert len(everything_else) == len(LABELS) - len(validation)
    with pytest.raises(DataError, match="class 0.*after exclusions"):
        split_train_validation(LABELS, train_per_class=26, validation_per_class=5, seed=1)


# ---------------------------------------------------------------- batch pipeline


def _collect(num_examples: int, batch_size: int, **kwargs) -> list[dict[str, np.ndarray]]:
    arrays = {"id": np.arange(num_examples), "image": np.ones((num_examples, 2, 2, 1), np.uint8)}
    return list(iterate_batches(arrays, batch_size, **kwargs))


def test_iterate_batches_fixed_shape_mask_and_coverage() -> None:
    batches = _collect(10, 4, shuffle=True, seed=0)
    assert len(batches) == num_batches(10, 4) == 3
    assert {batch["image"].shape for batch in batches} == {(4, 2, 2, 1)}
    assert all(batch["mask"].dtype == np.float32 for batch in batches)
    assert sum(batch["mask"].sum() for batch in batches) == 10
    seen = np.concatenate([batch["id"][batch["mask"] == 1] for batch in batches])
    assert sorted(seen.tolist()) == list(range(10))
    # Padding repeats a real row of the batch, so padded values stay valid.
    last = batches[-1]
    assert last["mask"].tolist() == [1, 1, 0, 0]
    assert set(last["id"][2:]) <= set(last["id"][:2])


def test_iterate_batches_order_per_seed_and_epoch() -> None:
    def order(**kwargs) -> list[int]:
        return np.concatenate([b["id"] for b in _collect(100, 10, shuffle=True, **kwargs)]).tolist()

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    unshuffled = np.concatenate([b["id"] for b in _collect(10, 5, shuffle=False, seed=0)])
    assert unshuffled.tolist() == list(range(10))


def test_iterate_batches_drop_remainder_and_errors() -> None:
    batches = _collect(10, 4, shuffle=False, seed=0, drop_remainder=True)
    assert len(batches) == num_batches(10, 4, drop_remainder=True) == 2
    assert all(batch["mask"].all() for batch in batches)
    # Bad input fails at the call, not later when the first batch is drawn.
    with pytest.raises(DataError, match=r"arrays\['y'\]"):
        iterate_batches({"x": np.zeros(3), "y": np.zeros(4)}, 2, shuffle=False, seed=0)
    with pytest.raises(DataError, match="reserved"):
        iterate_batches({"mask": np.zeros(3)}, 2, shuffle=False, seed=0)


def test_prepare_images_resizes_to_rgb_unit_range() -> None:
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    prepared = jax.jit(prepare_images, static_argnames="image_size")(images, image_size=16)
    assert prepared.shape == (2, 16, 16, 3) and prepared.dtype == jnp.float32
    assert float(prepared.min()) >= 0.0 and float(prepared.max()) <= 1.0
    np.testing.assert_array_equal(prepared[..., 0], prepared[..., 2])
    same_size = prepare_images(images, 8)
    np.testing.assert_allclose(same_size[..., 1], images[..., 0] / 255.0, rtol=1e-6)


def test_augment_images_shapes_and_per_example_randomness() -> None:
    images = jnp.asarray(np.random.default_rng(0).random((64, 8, 8, 3), dtype=np.float32))
    augment = jax.jit(augment_images, static_argnames=("random_crop", "flip", "crop_padding"))
    cropped = augment(jax.random.key(0), images, random_crop=True, flip=True)
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    # Reflect padding only reuses pixels, so the range is unchanged.
    assert float(cropped.min()) >= float(images.min())
    assert float(cropped.max()) <= float(images.max())
    flipped = augment(jax.random.key(1), images, random_crop=False, flip=True)
    is_mirrored = np.all(np.asarray(flipped) == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
    is_unchanged = np.all(np.asarray(flipped) == np.asarray(images), axis=(1, 2, 3))
    assert np.all(is_mirrored | is_unchanged)
    assert 0 < is_mirrored.sum() < len(images)  # decided per example
    untouched = augment(jax.random.key(2), images, random_crop=False, flip=False)
    np.testing.assert_array_equal(untouched, images)


def test_random_erasing_replaces_one_rectangle_in_the_chosen_share_of_images() -> None:
    # Constant images: an erased pixel is the one that differs from 0.5.
    images = jnp.full((400, 32, 32, 3), 0.5, jnp.float32)
    erased = np.asarray(erase_random_rectangles(jax.random.key(0), images, probability=0.5))
    assert erased.shape == images.shape and float(erased.min()) >= 0 and erased.max() <= 1
    changed = np.any(erased != 0.5, axis=-1)  # (N, H, W)
    hit = changed.any(axis=(1, 2))
    assert 0.4 < hit.mean() < 0.6  # about half the images, decided per image
    for mask in changed[hit]:
        rows, columns = np.nonzero(mask)
        top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
        box_area = (bottom - top + 1) * (right - left + 1)
        # One axis-aligned rectangle (uniform noise may leave a few pixels at 0.5 exactly:
        # none here in float32), within the paper's 2-40% of the image.
        assert mask.sum() == box_area
        assert 0.02 * 1024 * 0.7 <= box_area <= 0.4 * 1024 * 1.3
    areas = changed[hit].sum(axis=(1, 2))
    assert len(np.unique(areas)) > 20  # sizes drawn per image
    assert np.array_equal(
        np.asarray(erase_random_rectangles(jax.random.key(0), images, 0.0)), np.asarray(images)
    )


def test_augment_images_without_erasing_keeps_its_crops_and_flips() -> None:
    # Erasing draws from a key of its own: turning it on changes nothing but the rectangles.
    images = jnp.asarray(np.random.default_rng(1).random((32, 16, 16, 3), dtype=np.float32))
    plain = augment_images(jax.random.key(3), images, random_crop=True, flip=True)
    erased = augment_images(
        jax.random.key(3), images, random_crop=True, flip=True, erasing_probability=1.0
    )
    differs = np.asarray(plain) != np.asarray(erased)
    assert differs.any(axis=(1, 2, 3)).all()  # every image erased at probability 1
    assert (~differs).mean() > 0.5  # outside the rectangles the pixels are the same


def test_cutmix_pastes_a_box_of_a_real_partner_and_shares_the_label_by_its_area() -> None:
    # Every image a constant equal to its row index: a pixel says where it came from.
    batch = 64
    images = jnp.broadcast_to(
        jnp.arange(batch, dtype=jnp.uint8)[:, None, None, None], (batch, 20, 20, 1)
    )
    mask = jnp.asarray([1.0] * 56 + [0.0] * 8)  # the last 8 rows are padding
    mixed, partner, share = (
        np.asarray(a) for a in cutmix_images(jax.random.key(0), images, mask, probability=1.0)
    )
    assert mixed.shape == images.shape and mixed.dtype == np.uint8
    real = np.arange(56)
    assert set(partner[real]) <= set(real)  # never a padding row
    assert len(set(partner[real])) == 56  # a permutation of the real rows
    for row in real:
        from_partner = mixed[row, ..., 0] == partner[row]
        if partner[row] != row:
            # The share is exactly the pasted area, and the rest is the image's own pixels.
            assert from_partner.mean() == pytest.approx(share[row])
            assert np.all(mixed[row, ..., 0][~from_partner] == row)
            rows, columns = np.nonzero(from_partner)
            if len(rows):  # one box
                box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
                assert box == from_partner.sum()
    assert np.all(share[56:] == 0) and np.array_equal(mixed[56:], np.asarray(images)[56:])
    assert 0.2 < share[real].mean() < 0.7  # areas uniform over (0, 1), clipped at the borders
    untouched, _, no_share = cutmix_images(jax.random.key(0), images, mask, probability=0.0)
    assert np.array_equal(np.asarray(untouched), np.asarray(images)) and not np.any(no_share)


# ---------------------------------------------------------------- manifest


def test_image_manifest_columns_and_values(digit_splits) -> None:
    splits = {"train": digit_splits["train"], "test": digit_splits["test"]}
    manifest = image_manifest(splits, DIGIT_NAMES)
    assert list(manifest.columns) == list(IMAGE_MANIFEST_SCHEMA.columns)
    assert len(manifest) == 1797
    first = manifest.iloc[0]
    image = digit_splits["train"][0][0]
    assert (first["split"], first["index"], first["height"], first["channels"]) == (
        "train",
        0,
        8,
        1,
    )
    assert first["label_name"] == DIGIT_NAMES[first["label"]]
    assert first["mean_intensity"] == pytest.approx(image.mean())
    assert first["std_intensity"] == pytest.approx(image.std())
    # Stable hash: the same pixels give the same hash, a copy in another split is found.
    leaked = {"train": splits["train"], "test": (splits["train"][0][:3], splits["train"][1][:3])}
    leaked_manifest = image_manifest(leaked, DIGIT_NAMES)
    matches = cross_split_matches(leaked_manifest, "test", "train")
    assert matches["index"].tolist() == [0, 1, 2]
    assert len(first["content_hash"]) == 40  # hex SHA-1


def test_image_manifest_keeps_unknown_labels_for_validation() -> None:
    images = np.zeros((2, 2, 2, 1), np.uint8)
    manifest = image_manifest({"train": (images, np.array([0, 7]))}, ["a", "b"])
    assert manifest["label_name"].tolist()[0] == "a"
    assert manifest["label_name"].isna().tolist() == [False, True]


def test_fashion_mnist_to_tfds_keeps_every_class(fashion_mnist, tmp_path: Path) -> None:
    images, labels = fashion_mnist["test"]
    subset = stratified_subset(labels, per_class=3, seed=0)
    write_image_dataset(
        tmp_path, "fashion_mnist", {"test": (images[subset], labels[subset])}, FASHION_MNIST_CLASSES
    )
    read_images, read_labels = read_image_split(tmp_path, "fashion_mnist", "test")
    np.testing.assert_array_equal(read_images, images[subset])
    assert np.bincount(read_labels).tolist() == [3] * 10
    assert read_class_names(tmp_path, "fashion_mnist") == list(FASHION_MNIST_CLASSES)

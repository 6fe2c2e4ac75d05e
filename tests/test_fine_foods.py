"""small_fine_foods read from the real Debian r-cran-modeldata lazy-load database."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tlflax.data.fine_foods import (
    FINE_FOODS_CLASSES,
    FineFoodsDataError,
    read_fine_foods,
    split_by_product,
    split_stratified,
)

RAW_DIR = Path(__file__).resolve().parents[1] / "data" / "raw" / "modeldata"

pytestmark = pytest.mark.skipif(
    not (RAW_DIR / "Rdata.rdb").is_file(), reason=f"raw modeldata not fetched into {RAW_DIR}"
)


@pytest.fixture(scope="module")
def fine_foods() -> dict[str, pd.DataFrame]:
    return read_fine_foods(RAW_DIR)


def test_splits_have_the_published_sizes_and_labels(fine_foods: dict[str, pd.DataFrame]) -> None:
    train, test = fine_foods["train"], fine_foods["test"]
    assert len(train) == 4000 and len(test) == 1000
    assert list(train.columns) == ["product", "review", "label"]
    assert train["label"].value_counts().to_dict() == {"great": 2600, "other": 1400}
    assert set(test["label"]) == set(FINE_FOODS_CLASSES)
    # Product ids are 10-character ASINs; no product appears in both splits.
    assert train["product"].str.len().eq(10).all()
    assert not set(train["product"]) & set(test["product"])


def test_reviews_are_non_empty_utf8_text(fine_foods: dict[str, pd.DataFrame]) -> None:
    for frame in fine_foods.values():
        assert frame["review"].str.strip().str.len().gt(0).all()
        for review in frame["review"]:
            review.encode("utf-8")


def test_split_by_product_is_disjoint_complete_and_reproducible(
    fine_foods: dict[str, pd.DataFrame],
) -> None:
    train = fine_foods["train"]
    kept, held_out = split_by_product(train, validation_products=400, seed=7)
    assert held_out["product"].nunique() == 400
    assert not set(kept["product"]) & set(held_out["product"])
    assert len(kept) + len(held_out) == len(train)

    kept_again, held_out_again = split_by_product(train, validation_products=400, seed=7)
    pd.testing.assert_frame_equal(held_out, held_out_again)
    # Row order does not change which products are held out.
    _, held_out_shuffled = split_by_product(
        train.sample(frac=1.0, random_state=0), validation_products=400, seed=7
    )
    assert set(held_out_shuffled["product"]) == set(held_out["product"])
    _, other_seed = split_by_product(train, validation_products=400, seed=8)
    assert set(other_seed["product"]) != set(held_out["product"])

    with pytest.raises(ValueError, match="validation_products"):
        split_by_product(train, validation_products=len(train), seed=0)


def test_split_stratified_keeps_label_proportions(fine_foods: dict[str, pd.DataFrame]) -> None:
    kept, held_out = split_stratified(fine_foods["train"], validation_fraction=0.1, seed=0)
    assert held_out["label"].value_counts().to_dict() == {"great": 260, "other": 140}
    assert len(kept) == 3600


def test_missing_file_is_named(tmp_path: Path) -> None:
    shutil.copy(RAW_DIR / "Rdata.rdx", tmp_path / "Rdata.rdx")
    with pytest.raises(FineFoodsDataError, match="Rdata.rdb"):
        read_fine_foods(tmp_path)


def test_corrupt_database_is_named(tmp_path: Path) -> None:
    shutil.copy(RAW_DIR / "Rdata.rdx", tmp_path / "Rdata.rdx")
    (tmp_path / "Rdata.rdb").write_bytes(b"\0" * 4096)
    with pytest.raises(FineFoodsDataError, match=r"Rdata\.rdb is corrupt"):
        read_fine_foods(tmp_path)

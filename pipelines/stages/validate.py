"""Stage ``validate``: Great Expectations over the dataset manifest; gates everything after it.

A critical failure (wrong labels, imbalance, leakage, ...) exits non-zero with a readable
summary naming the failing checks and example records, so DVC records nothing downstream.
Warnings are reported and the run goes on. Imbalance that training will meet with a remedy
(params ``class_balance``, resolved from the training split as the training stages resolve
it) is a warning naming the remedy.
"""

from __future__ import annotations

import sys

import pandas as pd

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.balance import resolve_class_balance
from tlflax.config import Params, ParamsError
from tlflax.data.manifest import MANIFEST_SCHEMAS, class_counts
from tlflax.data.tfds_store import read_class_names
from tlflax.errors import MissingInputError
from tlflax.io import read_parquet, write_json
from tlflax.validation import ValidationThresholds, validate_manifest

EXIT_VALIDATION_FAILED = 1


def validate(params: Params, paths: ExperimentPaths) -> None:
    if not paths.manifest.exists():
        raise MissingInputError(f"{paths.manifest}: not found (run the prepare stage first)")
    manifest = read_parquet(paths.manifest)
    cfg = params.validate_params
    class_names = read_class_names(paths.dataset_dir, params.prepare.stored_name)
    weights = cfg.expected_class_weights
    # Only here, with the dataset's classes known, can the number of weights be checked.
    if weights is not None and len(weights) != len(class_names):
        raise ParamsError(
            f"'validate.expected_class_weights': {len(weights)} weights for "
            f"{len(class_names)} classes; give one per class, in label order: {class_names}"
        )
    thresholds = ValidationThresholds(
        expected_classes=class_names,
        max_label_kl_divergence=cfg.max_label_kl_divergence,
        max_class_ratio=cfg.max_class_ratio,
        min_examples_per_class=cfg.min_examples_per_class,
        max_split_kl_divergence=cfg.max_split_kl_divergence,
        max_duplicate_fraction=cfg.max_duplicate_fraction,
        max_mean_intensity_shift=cfg.max_feature_mean_shift,
        expected_class_weights=cfg.expected_class_weights,
        max_leakage_fraction=cfg.max_leakage_fraction,
        max_silent_fraction=cfg.max_silent_fraction,
        max_clipped_fraction=cfg.max_clipped_fraction,
        schema=MANIFEST_SCHEMAS[params.prepare.modality],
        class_balance_remedy=_remedy_in_force(params, manifest, class_names),
    )
    # Relative to the project root: the summary is a DVC metric, which later stages depend
    # on, and an absolute path in it would make a copy of the project in another folder
    # run them all again.
    summary = validate_manifest(manifest, thresholds, docs_dir=paths.data_docs)
    write_json(paths.metrics("validate"), summary.to_dict())
    print(summary.format_report())
    if not summary.success:
        sys.exit(EXIT_VALIDATION_FAILED)


def _remedy_in_force(params: Params, manifest: pd.DataFrame, class_names: list[str]) -> str | None:
    """The remedy training will apply to the training split's imbalance, described; None
    when there is none (or a class has no training example: the gate fails on that)."""
    counts = class_counts(manifest, "train", class_names)
    if counts.min() == 0:
        return None
    balance = resolve_class_balance(
        params.class_balance,
        counts.to_numpy(),
        max_class_ratio=params.validate_params.max_class_ratio,
    )
    return None if balance.remedy == "none" else balance.describe()


if __name__ == "__main__":
    run_stage("validate", validate)

"""Stage ``validate``: Great Expectations over the dataset manifest; gates everything after it.

A critical failure (wrong labels, imbalance, leakage, ...) exits non-zero with a readable
summary naming the failing checks and example records, so DVC records nothing downstream.
Warnings are reported and the run goes on.
"""

from __future__ import annotations

import sys

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params, ParamsError
from tlflax.data.manifest import MANIFEST_SCHEMAS
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
    )
    # Relative to the project root: the summary is a DVC metric, which later stages depend
    # on, and an absolute path in it would make a copy of the project in another folder
    # run them all again.
    summary = validate_manifest(manifest, thresholds, docs_dir=paths.data_docs)
    write_json(paths.metrics("validate"), summary.to_dict())
    print(summary.format_report())
    if not summary.success:
        sys.exit(EXIT_VALIDATION_FAILED)


if __name__ == "__main__":
    run_stage("validate", validate)

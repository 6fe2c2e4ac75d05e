"""Plan the Great Expectations suite of a manifest as plain data (no GX import).

:func:`plan_expectations` turns :class:`~tlflax.validation_suite.ValidationThresholds` and
a manifest's columns (its :class:`~tlflax.data.manifest.ManifestSchema`) into
:class:`_PlannedExpectation` records, which :func:`~tlflax.validation_suite.run_expectations`
builds into a GX suite. Expectations come in report order: the manifest's columns and
values, then each split's balance and duplicates, then each split against the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from tlflax.validation_suite import Severity, ValidationThresholds

_FEATURE_BINS = 10
# Weight given to values outside the reference range, so one outlier in a split makes the
# feature KL large but finite.
_TAIL_WEIGHT_HOLDOUT = 0.001


class _PlannedExpectation(NamedTuple):
    """A GX expectation as plain data, built into GX objects only once GX is imported."""

    name: str
    expectation_type: str  # class name in `great_expectations.expectations`
    kwargs: dict[str, Any]
    severity: Severity
    split: str | None  # restrict to the records of this split


def plan_expectations(
    manifest: pd.DataFrame, thresholds: ValidationThresholds, splits: list[str]
) -> list[_PlannedExpectation]:
    """The suite for ``manifest``: only expectations whose columns it has, in report order.

    ``splits`` are the known, non-empty splits, the reference split first when present.
    """
    # Expectations on a missing column would only raise; `schema.columns` names it instead.
    columns = set(manifest.columns)
    return [
        *_schema_expectations(thresholds, columns),
        *_value_expectations(thresholds, columns),
        *_content_expectations(thresholds, columns),
        *_audio_expectations(thresholds, columns),
        *_per_split_expectations(thresholds, columns, splits),
        *_representativeness_expectations(manifest, thresholds, columns, splits),
    ]


def _expect(
    name: str,
    expectation_type: str,
    severity: Severity = "critical",
    split: str | None = None,
    **kwargs: Any,
) -> _PlannedExpectation:
    return _PlannedExpectation(name, expectation_type, kwargs, severity, split)


def _present(wanted: tuple[str, ...], columns: set[str]) -> list[str]:
    # In schema order, not set order: string hashing is salted per process, and the suite
    # (and its Data Docs) should come out the same on every run.
    return [column for column in wanted if column in columns]


def _schema_expectations(
    thresholds: ValidationThresholds, columns: set[str]
) -> list[_PlannedExpectation]:
    """The schema's columns are there, and those that are hold no nulls."""
    schema = thresholds.schema
    planned = [
        _expect(
            "schema.columns",
            "ExpectTableColumnsToMatchSet",
            column_set=list(schema.columns),
            exact_match=False,
        )
    ]
    for column in _present(schema.columns, columns):
        planned.append(
            _expect(f"records.not_null.{column}", "ExpectColumnValuesToNotBeNull", column=column)
        )
    return planned


def _value_expectations(
    thresholds: ValidationThresholds, columns: set[str]
) -> list[_PlannedExpectation]:
    """Known splits and labels, label ids matching names, unique (split, index)."""
    classes = list(thresholds.expected_classes)
    known_splits = [*thresholds.required_splits, *thresholds.optional_splits]
    # (columns an expectation needs, the expectation), in report order.
    candidates = [
        (
            {"split"},
            _expect(
                "records.split_known",
                "ExpectColumnValuesToBeInSet",
                column="split",
                value_set=known_splits,
            ),
        ),
        (
            {"label_name"},
            _expect(
                "records.label_known",
                "ExpectColumnValuesToBeInSet",
                column="label_name",
                value_set=classes,
            ),
        ),
        (
            {"label"},
            _expect(
                "records.label_in_range",
                "ExpectColumnValuesToBeBetween",
                column="label",
                min_value=0,
                max_value=len(classes) - 1,
            ),
        ),
        (
            {"label", "label_name"},
            _expect(
                "records.label_matches_name",
                "ExpectColumnPairValuesToBeInSet",
                column_A="label",
                column_B="label_name",
                value_pairs_set=list(enumerate(classes)),
            ),
        ),
        (
            {"split", "index"},
            _expect(
                "records.unique_split_index",
                "ExpectCompoundColumnsToBeUnique",
                column_list=["split", "index"],
            ),
        ),
    ]
    return [expectation for needed, expectation in candidates if needed <= columns]


def _content_expectations(
    thresholds: ValidationThresholds, columns: set[str]
) -> list[_PlannedExpectation]:
    """Non-empty records, the modality's required flags, and (a warning) no constant records."""
    schema = thresholds.schema
    planned = [
        _expect(
            f"records.nonempty.{column}",
            "ExpectColumnValuesToBeBetween",
            column=column,
            min_value=1,
        )
        for column in _present(schema.size_columns, columns)
    ]
    for column, required in schema.required_flags:
        if column in columns:
            planned.append(
                _expect(
                    f"records.{column}",
                    "ExpectColumnValuesToBeInSet",
                    column=column,
                    value_set=[required],
                )
            )
    if schema.variation_column in columns:
        planned.append(
            _expect(
                "records.not_constant",
                "ExpectColumnValuesToBeBetween",
                "warning",
                column=schema.variation_column,
                min_value=0,
                strict_min=True,
            )
        )
    return planned


def _audio_expectations(
    thresholds: ValidationThresholds, columns: set[str]
) -> list[_PlannedExpectation]:
    """Audio clips: a sane source duration and sample rate, no silence, little clipping.

    Planned for the columns that the schema and the manifest both have, so image and text
    manifests get none of them.
    """
    present = columns & set(thresholds.schema.columns)
    candidates = [
        (
            "source_seconds",
            _expect(
                "records.source_seconds",
                "ExpectColumnValuesToBeBetween",
                column="source_seconds",
                min_value=0,
                strict_min=True,
                max_value=thresholds.max_source_seconds,
            ),
        ),
        (
            "source_sample_rate",
            _expect(
                "records.source_sample_rate",
                "ExpectColumnValuesToBeBetween",
                column="source_sample_rate",
                min_value=thresholds.min_source_sample_rate,
            ),
        ),
        (
            "is_silent",
            _expect(
                "records.not_silent",
                "ExpectColumnValuesToBeInSet",
                column="is_silent",
                value_set=[False],
                mostly=1.0 - thresholds.max_silent_fraction,
            ),
        ),
        (
            "clipped_fraction",
            _expect(
                "records.clipped_fraction",
                "ExpectColumnValuesToBeBetween",
                column="clipped_fraction",
                min_value=0,
                max_value=thresholds.max_clipped_fraction,
            ),
        ),
    ]
    return [expectation for column, expectation in candidates if column in present]


def _per_split_expectations(
    thresholds: ValidationThresholds, columns: set[str], splits: list[str]
) -> list[_PlannedExpectation]:
    """Each split's label distribution against the expected one, and its duplicate share."""
    classes = list(thresholds.expected_classes)
    weights = np.asarray(thresholds.expected_class_weights or [1.0] * len(classes), dtype=float)
    expected_labels = {"values": classes, "weights": (weights / weights.sum()).tolist()}
    planned = []
    for split in splits:
        if "label_name" in columns:
            planned.append(
                _expect(
                    f"balance.{split}.label_kl",
                    "ExpectColumnKLDivergenceToBeLessThan",
                    thresholds.label_balance_severity,
                    split=split,
                    column="label_name",
                    partition_object=expected_labels,
                    threshold=thresholds.max_label_kl_divergence,
                )
            )
        if "content_hash" in columns:
            planned.append(
                _expect(
                    f"duplicates.{split}",
                    "ExpectColumnValuesToBeUnique",
                    split=split,
                    column="content_hash",
                    mostly=1.0 - thresholds.max_duplicate_fraction,
                )
            )
    return planned


def _representativeness_expectations(
    manifest: pd.DataFrame,
    thresholds: ValidationThresholds,
    columns: set[str],
    splits: list[str],
) -> list[_PlannedExpectation]:
    """Each split after the reference against it: labels, binned features, feature means."""
    reference = thresholds.required_splits[0]
    if reference not in splits:
        return []
    reference_rows = manifest[manifest["split"] == reference]
    planned = []
    for split in splits[1:]:
        if "label_name" in columns:
            shares = reference_rows["label_name"].dropna().value_counts(normalize=True)
            reference_labels = {"values": shares.index.tolist(), "weights": shares.tolist()}
            planned.append(
                _expect(
                    f"representativeness.{split}.label_kl",
                    "ExpectColumnKLDivergenceToBeLessThan",
                    thresholds.label_balance_severity,
                    split=split,
                    column="label_name",
                    partition_object=reference_labels,
                    threshold=thresholds.max_split_kl_divergence,
                )
            )
        for feature in _present(thresholds.schema.distribution_columns, columns):
            values = reference_rows[feature].dropna().to_numpy(dtype=float)
            planned += _feature_shift_expectations(values, thresholds, split, feature)
    return planned


def _feature_shift_expectations(
    reference_values: np.ndarray, thresholds: ValidationThresholds, split: str, feature: str
) -> list[_PlannedExpectation]:
    """``feature``'s binned distribution and mean in ``split`` against the reference values."""
    severity = thresholds.feature_shift_severity
    planned = []
    # Quantile bins hold equal reference mass; ties (e.g. a constant feature) merge bins.
    edges = np.unique(np.quantile(reference_values, np.linspace(0, 1, _FEATURE_BINS + 1)))
    if len(edges) >= 2:
        binned = {
            "bins": edges.tolist(),
            "weights": (np.histogram(reference_values, edges)[0] / len(reference_values)).tolist(),
        }
        planned.append(
            _expect(
                f"representativeness.{split}.{feature}_kl",
                "ExpectColumnKLDivergenceToBeLessThan",
                severity,
                split,
                column=feature,
                partition_object=binned,
                threshold=thresholds.max_split_kl_divergence,
                tail_weight_holdout=_TAIL_WEIGHT_HOLDOUT,
            )
        )
    if thresholds.max_mean_intensity_shift is not None:
        mean = float(reference_values.mean())
        margin = thresholds.max_mean_intensity_shift * abs(mean)
        planned.append(
            _expect(
                f"representativeness.{split}.{feature}_mean_shift",
                "ExpectColumnMeanToBeBetween",
                severity,
                split,
                column=feature,
                min_value=mean - margin,
                max_value=mean + margin,
            )
        )
    return planned

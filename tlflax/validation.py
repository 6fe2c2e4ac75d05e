"""Validate a dataset manifest with Great Expectations (GX Core 1.x) and summarise the result.

The suite is built from plain thresholds (:class:`ValidationThresholds`) and run over the
manifest (:mod:`tlflax.data.manifest`): one row per example. Checks, by name prefix:

- ``schema`` / ``records``: required columns, no nulls, known splits and labels, label id
  matching label name, unique (split, index), non-empty records, the modality's flags
  (text: not blank, valid UTF-8); constant records warn. Audio clips: the source lasts
  more than 0 s and at most ``max_source_seconds``, its sample rate is at least
  ``min_source_sample_rate``, at most ``max_silent_fraction`` of the clips are silent, and
  none has more than ``max_clipped_fraction`` of its frames clipped.
- ``splits``: every required split has records.
- ``balance.<split>``: KL divergence of the label distribution from the expected one, the
  largest/smallest class count ratio, and a minimum count per class.
- ``duplicates.<split>``: share of records whose content hash repeats within the split.
- ``representativeness.<split>``: label and feature distributions, and feature means, of
  each split against the reference split (train).
- ``leakage.<split>_vs_<other>``: records whose content also appears in an earlier split.

GX runs every check it has an expectation for (so they appear in Data Docs; see
:mod:`tlflax.validation_suite`); the few it has none for (class ratio, minimum per class,
cross-split leakage, empty required splits) are computed here and reported beside them.
Each check is ``critical`` or ``warning``; validation succeeds when no critical check fails.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tlflax.data.manifest import class_counts, cross_split_matches
from tlflax.validation_suite import (
    MAX_EXAMPLE_RECORDS,
    CheckResult,
    ValidationThresholds,
    json_ready,
    plan_expectations,
    run_expectations,
)

__all__ = ["CheckResult", "ValidationSummary", "ValidationThresholds", "validate_manifest"]

# Report order of the check families (first part of each check name).
_CHECK_ORDER = (
    "schema",
    "records",
    "splits",
    "balance",
    "duplicates",
    "representativeness",
    "leakage",
)


@dataclass(frozen=True)
class ValidationSummary:
    """All check results, the verdict, and where the Data Docs are."""

    success: bool
    checks: list[CheckResult]
    data_docs_index: Path

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that did not pass, critical first."""
        failed = [check for check in self.checks if not check.passed]
        return sorted(failed, key=lambda check: check.severity != "critical")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become strings such as ``"inf"``)."""
        return json_ready(
            {
                "success": self.success,
                "num_checks": len(self.checks),
                "num_critical_failures": sum(
                    check.severity == "critical" for check in self.failures
                ),
                "num_warnings": sum(check.severity == "warning" for check in self.failures),
                "data_docs_index": str(self.data_docs_index),
                "checks": [_check_record(check) for check in self.checks],
            }
        )

    def format_report(self) -> str:
        """A short text naming the verdict, each failing check and example records."""
        failures = self.failures
        critical = sum(check.severity == "critical" for check in failures)
        lines = [
            f"Data validation {'PASSED' if self.success else 'FAILED'}: {len(self.checks)} checks, "
            f"{critical} critical failures, {len(failures) - critical} warnings."
        ]
        for check in failures:
            lines.append(
                f"  {check.severity.upper():8} {check.name}: observed {_short(check.observed)}, "
                f"threshold {_short(check.threshold)}"
            )
            if check.note:
                lines.append(f"           {check.note}")
            if check.failing_records:
                lines.append(
                    "           records: " + ", ".join(map(_record_label, check.failing_records))
                )
        lines.append(f"Data Docs: {self.data_docs_index}")
        return "\n".join(lines)


def validate_manifest(
    manifest: pd.DataFrame, thresholds: ValidationThresholds, *, docs_dir: Path
) -> ValidationSummary:
    """Run the validation suite over ``manifest`` and build Data Docs under ``docs_dir``.

    Args:
        manifest: one row per example, with the columns of ``thresholds.schema``.
        thresholds: the limits to check.
        docs_dir: folder of the Data Docs site (created); each run replaces the pages of
            the previous one, since GX drops pages of results it no longer holds.

    Returns:
        The summary; ``success`` is False when any critical check failed. Its
        ``data_docs_index`` is under ``docs_dir`` as given: relative when it is relative,
        so a summary written inside a project does not depend on where the project is.
    """
    # GX refuses a relative site folder when the context has no root directory.
    site_dir = docs_dir.absolute()
    site_dir.mkdir(parents=True, exist_ok=True)
    records_per_split = (
        manifest["split"].astype(str).value_counts().to_dict() if "split" in manifest else {}
    )
    # Known, non-empty splits in threshold order: the reference split comes first.
    splits = [
        split
        for split in (*thresholds.required_splits, *thresholds.optional_splits)
        if records_per_split.get(split)
    ]
    checks = run_expectations(manifest, plan_expectations(manifest, thresholds, splits), site_dir)
    checks += _computed_checks(manifest, thresholds, splits, records_per_split)
    checks = [_with_balance_note(check, thresholds) for check in checks]
    checks.sort(key=lambda check: (_CHECK_ORDER.index(check.name.split(".")[0]), check.name))
    success = not any(check.severity == "critical" and not check.passed for check in checks)
    return ValidationSummary(success, checks, docs_dir / "index.html")


def _computed_checks(
    manifest: pd.DataFrame,
    thresholds: ValidationThresholds,
    splits: list[str],
    records_per_split: dict[str, int],
) -> list[CheckResult]:
    """The checks GX has no expectation for: empty splits, class ratio and minimum, leakage."""
    empty = [split for split in thresholds.required_splits if not records_per_split.get(split)]
    checks = [
        CheckResult(
            "splits.required_nonempty",
            "critical",
            passed=not empty,
            observed={"records_per_split": records_per_split, "empty_splits": empty},
            threshold={"min_records": 1, "splits": list(thresholds.required_splits)},
        )
    ]
    if {"label_name", "split"} <= set(manifest.columns):
        for split in splits:
            checks += _class_count_checks(manifest, thresholds, split)
    if {"content_hash", "split", "index"} <= set(manifest.columns):
        for position, split in enumerate(splits):
            for earlier in splits[:position]:
                checks.append(
                    _leakage_check(manifest, thresholds, split, earlier, records_per_split[split])
                )
    return checks


def _class_count_checks(
    manifest: pd.DataFrame, thresholds: ValidationThresholds, split: str
) -> list[CheckResult]:
    """``split``'s largest/smallest class ratio and its classes below the minimum count."""
    counts = class_counts(manifest, split, thresholds.expected_classes)
    ratio = math.inf if counts.min() == 0 else counts.max() / counts.min()
    too_few = counts[counts < thresholds.min_examples_per_class]
    return [
        CheckResult(
            f"balance.{split}.class_ratio",
            thresholds.label_balance_severity,
            passed=ratio <= thresholds.max_class_ratio,
            observed=json_ready(
                {"ratio": ratio, "largest": counts.idxmax(), "smallest": counts.idxmin()}
            ),
            threshold=thresholds.max_class_ratio,
        ),
        CheckResult(
            f"balance.{split}.min_per_class",
            "critical",
            passed=too_few.empty,
            observed=json_ready({"classes_below": too_few.to_dict(), "min_count": counts.min()}),
            threshold=thresholds.min_examples_per_class,
        ),
    ]


# The checks an imbalanced label distribution fails, and a training remedy answers.
_LABEL_BALANCE_CHECK = re.compile(
    r"^(balance\.\w+\.(class_ratio|label_kl)|representativeness\.\w+\.label_kl)$"
)
NO_REMEDY_NOTE = (
    "no remedy trains against it: set class_balance.remedy to logit_adjustment (what auto "
    "picks beyond validate.max_class_ratio), weights or sampler in params.yaml"
)


def _with_balance_note(check: CheckResult, thresholds: ValidationThresholds) -> CheckResult:
    """A failed label-balance check with what answers it: the remedy in force, or the key
    that turns one on."""
    if check.passed or not _LABEL_BALANCE_CHECK.match(check.name):
        return check
    remedy = thresholds.class_balance_remedy
    note = NO_REMEDY_NOTE if remedy is None else f"remedy in force: class balance {remedy}"
    return dataclasses.replace(check, note=note)


def _leakage_check(
    manifest: pd.DataFrame,
    thresholds: ValidationThresholds,
    split: str,
    earlier: str,
    split_records: int,
) -> CheckResult:
    """The records of ``split`` whose content also occurs in the ``earlier`` split."""
    matches = cross_split_matches(manifest, split, earlier)
    fraction = len(matches) / split_records
    records = [
        {"split": split, "index": int(index), "same_as": f"{earlier}[{int(other)}]"}
        for index, other in matches.head(MAX_EXAMPLE_RECORDS).itertuples(index=False)
    ]
    return CheckResult(
        f"leakage.{split}_vs_{earlier}",
        "critical",
        passed=fraction <= thresholds.max_leakage_fraction,
        observed={"leaked_records": len(matches), "fraction": fraction},
        threshold=thresholds.max_leakage_fraction,
        failing_records=records,
    )


def _check_record(check: CheckResult) -> dict[str, Any]:
    """A check as a dict; a check without a note has no ``note`` key (as before notes)."""
    record = dict(vars(check))
    if record["note"] is None:
        del record["note"]
    return record


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _record_label(record: dict[str, Any]) -> str:
    label = f"{record.get('split', '?')}[{record.get('index', '?')}]"
    return f"{label} (same as {record['same_as']})" if "same_as" in record else label

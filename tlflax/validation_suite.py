"""The Great Expectations half of data validation: thresholds, the planned suite, its run.

:func:`plan_expectations` (from :mod:`tlflax.validation_plan`, re-exported here) turns
:class:`ValidationThresholds` and a manifest's columns (its
:class:`~tlflax.data.manifest.ManifestSchema`) into plain expectation records;
:func:`run_expectations` builds them into a GX suite, runs it over the manifest with
Data Docs, and returns one :class:`CheckResult` per expectation. Planning is plain data so
that GX (about 5 s to import) is imported only when a suite actually runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from tlflax.data.manifest import IMAGE_MANIFEST_SCHEMA, ManifestSchema
from tlflax.offline_pages import localise_data_docs
from tlflax.validation_plan import _PlannedExpectation
from tlflax.validation_plan import plan_expectations as plan_expectations  # re-exported

Severity = Literal["critical", "warning"]
MAX_EXAMPLE_RECORDS = 10


@dataclass(frozen=True)
class ValidationThresholds:
    """Limits the manifest must respect.

    Attributes:
        expected_classes: the label names, in label-id order.
        max_label_kl_divergence: KL divergence of each split's label distribution from
            ``expected_class_weights`` (uniform when None).
        max_class_ratio: largest / smallest class count within a split.
        min_examples_per_class: fewest examples any class may have in any split.
        max_split_kl_divergence: KL divergence of each split's label and binned feature
            distributions from the reference split's. With B bins (10 for features) and N
            records, sampling noise alone gives about (B - 1) / (2 N).
        max_duplicate_fraction: share of a split's records whose content repeats (< 1).
        max_mean_intensity_shift: largest relative change of each distribution feature's
            mean (for images: mean and std of intensity) from the reference split; None
            skips the check.
        expected_class_weights: expected label distribution (normalised here).
        max_leakage_fraction: share of a split's records that may also occur in an earlier split.
        required_splits: splits that must exist and be non-empty; the first is the
            reference for representativeness and leakage.
        optional_splits: other split names that are allowed.
        feature_shift_severity: severity of the feature distribution and mean checks;
            image statistics are a proxy, so by default they warn rather than block.
        schema: the manifest's column contract (image by default; see
            :data:`~tlflax.data.manifest.TEXT_MANIFEST_SCHEMA` and
            :data:`~tlflax.data.manifest.AUDIO_MANIFEST_SCHEMA`).
        min_source_sample_rate, max_source_seconds: audio only: the lowest sample rate
            (Hz; 8 kHz is telephone speech) and the longest duration (seconds) a clip's
            source file may have; a source must also last more than 0 s.
        max_silent_fraction: audio only: share of the clips (all splits) that may be silent.
        max_clipped_fraction: audio only: largest share of one clip's frames at full scale.
        class_balance_remedy: the remedy training applies to imbalanced data (e.g.
            ``"weights (auto: largest/smallest 10.00 > validate.max_class_ratio 1.5)"``);
            with one, the label-balance checks (class ratio, label KL divergences) warn
            instead of failing. None: no remedy, and they are critical.
    """

    expected_classes: list[str]
    max_label_kl_divergence: float = 0.05
    max_class_ratio: float = 2.0
    min_examples_per_class: int = 5
    max_split_kl_divergence: float = 0.05
    max_duplicate_fraction: float = 0.01
    max_mean_intensity_shift: float | None = 0.1
    expected_class_weights: list[float] | None = None
    max_leakage_fraction: float = 0.0
    required_splits: tuple[str, ...] = ("train", "test")
    optional_splits: tuple[str, ...] = ("validation",)
    feature_shift_severity: Severity = "warning"
    schema: ManifestSchema = IMAGE_MANIFEST_SCHEMA
    min_source_sample_rate: int = 8000
    max_source_seconds: float = 600.0
    max_silent_fraction: float = 0.0
    max_clipped_fraction: float = 0.01
    class_balance_remedy: str | None = None

    @property
    def label_balance_severity(self) -> Severity:
        """Critical, unless a remedy makes training meet imbalance (then a warning)."""
        return "critical" if self.class_balance_remedy is None else "warning"

    def __post_init__(self) -> None:
        if not self.expected_classes or not self.required_splits:
            raise ValueError("expected_classes and required_splits must not be empty")
        if self.expected_class_weights is not None and (
            len(self.expected_class_weights) != len(self.expected_classes)
            or sum(self.expected_class_weights) <= 0
        ):
            raise ValueError("expected_class_weights needs one positive-sum weight per class")
        if not 0.0 <= self.max_duplicate_fraction < 1.0:
            raise ValueError("max_duplicate_fraction must be in [0, 1)")
        if not 0.0 <= self.max_silent_fraction < 1.0:
            raise ValueError("max_silent_fraction must be in [0, 1)")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: dotted check name, e.g. ``"balance.train.class_ratio"``.
        severity: ``"critical"`` (fails validation) or ``"warning"`` (reported only).
        passed: whether the data met the threshold.
        observed: the measured value.
        threshold: the limit it was compared with.
        failing_records: up to 10 offending records, each ``{"split", "index", ...}``.
        source: the GX expectation type, or ``"computed"``.
        note: what to do about a failure, or what already answers it (None: nothing).
    """

    name: str
    severity: Severity
    passed: bool
    observed: Any
    threshold: Any
    failing_records: list[dict[str, Any]] = field(default_factory=list)
    source: str = "computed"
    note: str | None = None


def run_expectations(
    manifest: pd.DataFrame, planned: list[_PlannedExpectation], docs_dir: Path
) -> list[CheckResult]:
    """Build ``planned`` into a GX suite, run it over ``manifest`` with Data Docs in ``docs_dir``."""
    # Set before the import: GX reads it when it loads. We make no network calls.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    context = _ephemeral_context(docs_dir)
    suite = context.suites.add(
        gx.ExpectationSuite(name="manifest", expectations=_gx_expectations(planned))
    )
    checkpoint = _manifest_checkpoint(context, suite, manifest)
    run = checkpoint.run(batch_parameters={"dataframe": manifest})
    # GX's pages load their scripts and styles from CDNs: point them at local copies.
    localise_data_docs(docs_dir)
    (validation_result,) = run.run_results.values()
    return [_check_from_gx(result) for result in validation_result.results]


def _ephemeral_context(docs_dir: Path) -> Any:
    """A GX context with in-memory stores and one Data Docs site (GX already imported)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In-memory stores (nothing left behind) and a single Data Docs site, in docs_dir
    # rather than the default temporary folder.
    site_store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            "local_site": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": site_store,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _gx_expectations(planned: list[_PlannedExpectation]) -> list[Any]:
    """The GX expectation objects of ``planned``, each tagged with its check name."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    expectations = []
    for plan in planned:
        kwargs = dict(plan.kwargs, meta={"check": plan.name}, severity=plan.severity)
        if plan.split is not None:  # table-level expectations take no row condition
            kwargs["row_condition"] = Column("split") == plan.split
        expectations.append(getattr(gxe, plan.expectation_type)(**kwargs))
    return expectations


def _manifest_checkpoint(context: Any, suite: Any, manifest: pd.DataFrame) -> Any:
    """A checkpoint running ``suite`` over a whole-dataframe batch and updating Data Docs."""
    import great_expectations as gx

    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    )
    return context.checkpoints.add(
        gx.Checkpoint(
            name="manifest",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={
                "result_format": "SUMMARY",
                # Failing records are reported by (split, index), not by dataframe row.
                "unexpected_index_column_names": [c for c in ("split", "index") if c in manifest],
                "partial_unexpected_count": MAX_EXAMPLE_RECORDS,
            },
        )
    )


def _check_from_gx(result: Any) -> CheckResult:
    config = result.expectation_config
    details, kwargs = result.result or {}, config.kwargs
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed: Any = f"error: {result.exception_info.get('exception_message')}"
    elif config.type == "expect_table_columns_to_match_set":
        observed = (
            {"missing_columns": details["details"]["mismatched"].get("missing", [])}
            if "details" in details
            else {}
        )
    elif "observed_value" in details:
        # GX reports no KL value when a split holds a label the expected partition lacks.
        observed = details["observed_value"] if details["observed_value"] is not None else math.inf
    else:
        observed = {key: details.get(key) for key in ("unexpected_count", "unexpected_percent")}
    if "threshold" in kwargs:
        threshold: Any = kwargs["threshold"]
    elif kwargs.get("mostly", 1.0) < 1.0:
        threshold = {"max_unexpected_fraction": 1.0 - kwargs["mostly"]}
    else:
        limits = ("min_value", "max_value", "value_set", "value_pairs_set", "column_set")
        threshold = {key: kwargs[key] for key in limits if kwargs.get(key) is not None}
    records = details.get("partial_unexpected_index_list") or []
    return CheckResult(
        name=config.meta["check"],
        severity=config.severity.value,
        passed=bool(result.success),
        observed=json_ready(observed),
        threshold=json_ready(threshold),
        failing_records=json_ready(records[:MAX_EXAMPLE_RECORDS]),
        source=config.type,
    )


def json_ready(value: Any) -> Any:
    """Plain Python for json.dumps: numpy scalars unwrapped, NaN/inf as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value

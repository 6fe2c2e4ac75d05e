"""Stage ``extract``: run the frozen pretrained backbone once over every split.

The features are a DVC output, so head training (and any change to the head's params)
never pays for the backbone again.
"""

from __future__ import annotations

import time

from flax import nnx

from pipelines.stages.common import ExperimentPaths, check_batch_fits, run_stage
from pipelines.stages.tasks import task_for
from tlflax.advisor import load_advice
from tlflax.config import Params
from tlflax.io import atomic_path, write_arrays
from tlflax.models.registry import create_backbone
from tlflax.plan import resolve_taps
from tlflax.probes import features_by_depth
from tlflax.taps import joined_numpy

SPLITS = ("train", "validation", "test")


def extract(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.extract
    task = task_for(params, paths)
    backbone, report = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, rngs=nnx.Rngs(params.finetune.seed)
    )
    # The depths the head reads: extract.taps resolved with the advice, as the plan stage
    # resolves them (reading the advice, not the plan, keeps a change of the fine-tuning
    # settings from re-running the backbone over every split).
    advice = load_advice(paths.metrics("advice"))
    taps = resolve_taps(
        cfg.taps,
        None if advice.taps is None else advice.taps.taps,
        num_groups=len(backbone.group_patterns()),
    )
    if report is not None:
        print(f"extract: loaded {len(report.loaded)} pretrained tensors for {cfg.backbone}")
    if taps is not None:
        print(f"extract: the head reads layer groups {taps}")
    with atomic_path(paths.features, directory=True) as features_dir:
        for split in SPLITS:
            inputs = task.read_inputs(split)
            check_batch_fits("extract.batch_size", cfg.batch_size, inputs)
            started = time.perf_counter()
            if taps is None:
                features = task.extract_features(backbone, inputs, description=f"extract {split}")
            else:
                by_depth = features_by_depth(
                    backbone,
                    task.pooled_after_each_group,
                    {split: inputs},
                    batch_size=cfg.batch_size,
                )[split]
                features = joined_numpy(by_depth, taps)
            seconds = time.perf_counter() - started
            count = len(inputs["label"])
            write_arrays(features_dir / f"{split}.npz", features=features, label=inputs["label"])
            print(
                f"extract: {split}: {count} examples -> {features.shape[1]} features "
                f"in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} examples/s)"
            )


if __name__ == "__main__":
    run_stage("extract", extract)

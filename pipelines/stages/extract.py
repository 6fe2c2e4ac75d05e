"""Stage ``extract``: run the frozen pretrained backbone once over every split.

The features are a DVC output, so head training (and any change to the head's params)
never pays for the backbone again.
"""

from __future__ import annotations

import time

from pipelines.stages.common import ExperimentPaths, check_batch_fits, run_stage
from tlflax.advisor import load_advice
from tlflax.api import backbone_for, extract_features, head_taps
from tlflax.config import Params
from tlflax.io import atomic_path, write_arrays
from tlflax.tasks import task_for

SPLITS = ("train", "validation", "test")


def extract(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.extract
    task = task_for(params, paths.dataset_dir)
    backbone = backbone_for(params)
    # The depths the head reads: extract.taps resolved with the advice, as the plan stage
    # resolves them (reading the advice, not the plan, keeps a change of the fine-tuning
    # settings from re-running the backbone over every split).
    taps = head_taps(params, load_advice(paths.metrics("advice")))
    if taps is not None:
        print(f"extract: the head reads layer groups {taps}")
    with atomic_path(paths.features, directory=True) as features_dir:
        for split in SPLITS:
            inputs = task.read_inputs(split)
            check_batch_fits("extract.batch_size", cfg.batch_size, inputs)
            started = time.perf_counter()
            features = extract_features(task, backbone, taps, inputs)
            seconds = time.perf_counter() - started
            count = len(inputs["label"])
            write_arrays(features_dir / f"{split}.npz", features=features, label=inputs["label"])
            print(
                f"extract: {split}: {count} examples -> {features.shape[1]} features "
                f"in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} examples/s)"
            )


if __name__ == "__main__":
    run_stage("extract", extract)

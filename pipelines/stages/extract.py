"""Stage ``extract``: run the frozen pretrained backbone once over every split.

The features are a DVC output, so head training (and any change to the head's params)
never pays for the backbone again.
"""

from __future__ import annotations

import time

from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params
from tlflax.data.tfds_store import read_image_split
from tlflax.io import atomic_path, write_arrays
from tlflax.models.registry import create_backbone
from tlflax.vision import extract_features

SPLITS = ("train", "validation", "test")


def extract(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.extract
    backbone, report = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, rngs=nnx.Rngs(params.finetune.seed)
    )
    if report is not None:
        print(f"extract: loaded {len(report.loaded)} pretrained tensors for {cfg.backbone}")
    with atomic_path(paths.features, directory=True) as features_dir:
        for split in SPLITS:
            images, labels = read_image_split(paths.dataset_dir, params.prepare.dataset, split)
            started = time.perf_counter()
            features = extract_features(
                backbone,
                images,
                image_size=cfg.image_size,
                batch_size=cfg.batch_size,
                description=f"extract {split}",
            )
            seconds = time.perf_counter() - started
            write_arrays(features_dir / f"{split}.npz", features=features, label=labels)
            print(
                f"extract: {split}: {len(labels)} images -> {features.shape[1]} features "
                f"in {seconds:.1f} s ({len(labels) / max(seconds, 1e-9):.0f} images/s)"
            )


if __name__ == "__main__":
    run_stage("extract", extract)

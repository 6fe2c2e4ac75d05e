"""Stage ``prepare``: raw files → a TFDS dataset with train / validation / test splits.

The drawing of the splits is the library's (:func:`tlflax.data.sources.prepare_dataset`,
whose docstring says how); this stage adds the manifest the validate stage checks.
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params
from tlflax.data.sources import prepare_dataset
from tlflax.io import atomic_path


def prepare(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.prepare
    prepared = prepare_dataset(cfg, paths.dataset_dir)
    if cfg.deduplicate:
        print(
            f"prepare: dropped {prepared.duplicates_dropped} training-pool records that "
            "repeat another record or occur in test"
        )
    with atomic_path(paths.manifest) as temporary:
        prepared.manifest(cfg.modality).to_parquet(temporary, index=False)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in prepared.splits.items())
    print(f"prepare: wrote {paths.dataset_dir} ({sizes})")


if __name__ == "__main__":
    run_stage("prepare", prepare)

"""Stage ``train_scratch``: the reference - the same network from random weights, same budget.

Its settings are the plan's ``scratch`` entry (``metrics/<experiment>/plan.json``): the
fine-tuning run's epochs, schedule, augmentation and early stopping, with everything
training from random weights at ``train_scratch``'s learning rate.
"""

from __future__ import annotations

from flax import nnx

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.training import fit_and_save, run_fingerprint
from tlflax.config import Params
from tlflax.distributed import initialize_from_environment
from tlflax.fit import build_scratch_classifier
from tlflax.plan import load_plan
from tlflax.tasks import task_for


def run(params: Params, paths: ExperimentPaths) -> None:
    # Several processes (JAX_NUM_PROCESSES > 1) train as one: README, "Across processes".
    initialize_from_environment()
    plan = load_plan(paths.metrics("plan"))
    cfg = plan.scratch
    task = task_for(params, paths.dataset_dir)
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    model = build_scratch_classifier(task, len(task.class_names()), cfg.seed, plan.head_taps)
    fit_and_save(
        "train_scratch",
        model,
        task.forward(cfg),
        cfg,
        train,
        validation,
        paths=paths,
        eval_batch_size=params.evaluate.batch_size,
        fingerprint=run_fingerprint([plan, params], train, validation, nnx.state(model)),
        balance=plan.class_balance,
    )


if __name__ == "__main__":
    run_stage("train_scratch", run)

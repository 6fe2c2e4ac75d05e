"""Stage ``finetune``: backbone + trained head, unfrozen by the plan, per-group learning rates.

Every setting comes from the run's plan (``metrics/<experiment>/plan.json``, written by the
``plan`` stage from the advice and params.yaml): ``feature_extraction`` trains the head
alone, from train_head's head, on the frozen backbone; ``top_k`` the top k layer groups and
the head; ``full`` everything; ``scratch`` the same network from random weights, as
``train_scratch`` does. Where the plan's ``contrastive.pair_rounds`` asks for it (text),
SetFit's contrastive stage comes first: the encoder tuned on pairs of training examples and
a new head fitted on its features (finetune.json's ``contrastive`` says how it went).

With the plan's ``cache_frozen_prefix``, the backbone's fully frozen bottom layer groups run
once over train and validation (inference mode) and the steps train the layers above from
their cached outputs (:mod:`tlflax.prefix_cache`); the saved model is still the whole one.
"""

from __future__ import annotations

from flax import nnx

from pipelines.stages.common import (
    ExperimentPaths,
    check_batch_fits,
    run_stage,
)
from pipelines.stages.training import fit_and_save, run_fingerprint
from tlflax.api import contrastive_stage, initial_classifier
from tlflax.checkpoint import restore_tree
from tlflax.config import Params
from tlflax.distributed import initialize_from_environment
from tlflax.fit import cache_frozen_prefix
from tlflax.plan import load_plan, plan_table
from tlflax.tasks import task_for


def run(params: Params, paths: ExperimentPaths) -> None:
    # Several processes (JAX_NUM_PROCESSES > 1) train as one: README, "Across processes".
    initialize_from_environment()
    plan = load_plan(paths.metrics("plan"))
    cfg = plan.finetune
    table = plan_table(plan, params.prepare.modality)
    print(f"finetune: the plan ({paths.metrics('plan')}):\n{table}")
    task = task_for(params, paths.dataset_dir)
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    model = initial_classifier(task, plan)
    if cfg.strategy != "scratch":  # fine-tuning starts from train_head's head
        nnx.update(model.head, restore_tree(paths.head, nnx.state(model.head, nnx.Param)))
    # SetFit (finetune.contrastive): the encoder tuned on pairs, then a new head, first.
    contrastive = contrastive_stage(task, plan, model, train, validation)
    if contrastive is not None:
        print(
            f"finetune: contrastive stage, {contrastive['pairs']} pairs in "
            f"{contrastive['seconds']:.0f} s: pair loss {contrastive['first_loss']:.4f} -> "
            f"{contrastive['last_loss']:.4f}; new head validation accuracy "
            f"{contrastive['head_validation_accuracy']:.4f}"
        )
    check_batch_fits("finetune.batch_size", cfg.batch_size, train)
    check_batch_fits("evaluate.batch_size", params.evaluate.batch_size, validation)
    # Before the prefix cache replaces the inputs: what the run starts from, whatever path.
    fingerprint = run_fingerprint([plan, params], train, validation, nnx.state(model))
    inputs = cache_frozen_prefix(
        task, model, cfg, train, validation, batch_size=params.extract.batch_size, name="finetune"
    )
    fit_and_save(
        "finetune",
        model,
        inputs.forward,
        cfg,
        inputs.train,
        inputs.validation,
        paths=paths,
        eval_batch_size=params.evaluate.batch_size,
        fingerprint=fingerprint,
        balance=plan.class_balance,
        extra_metrics={} if contrastive is None else {"contrastive": contrastive},
    )


if __name__ == "__main__":
    run_stage("finetune", run)

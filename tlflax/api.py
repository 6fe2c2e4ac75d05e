"""The steps of a transfer-learning run, as functions a notebook calls (no Prefect, no DVC).

Each pipeline stage is one of these steps with its files around it, so a notebook and
``dvc repro`` run the same code::

    task = prepare_dataset(params, "work/data")       # source -> train / validation / test
    advice = advise(task)                             # probes per depth -> strategy, taps
    task = chosen_task(task, advice)                  # extract.backbone: auto -> the pick
    plan = make_plan(task, advice)                    # every training setting, decided
    head = train_new_head(task, plan.head_taps)       # head on frozen features
    result = fine_tune(task, plan, head, checkpoint_dir="work/checkpoints")
    report = evaluate(task, result.model, plan.finetune)

or all of it at once: :func:`run_transfer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from tlflax.advisor import Advice, count_per_class, measure, recommend
from tlflax.backbone_choice import (
    BackboneCandidate,
    candidate_backbones,
    choose_backbone,
    forward_flops,
    parameter_count,
)
from tlflax.balance import training_class_balance
from tlflax.checkpoint import delete_checkpoints
from tlflax.config import AUTO_BACKBONE, FinetuneParams, Params, ParamsError
from tlflax.contrastive import contrastive_start
from tlflax.data.sources import prepare_dataset as _prepare_source
from tlflax.data.subsets import at_most, take
from tlflax.errors import MissingInputError
from tlflax.fit import (
    FitResult,
    build_scratch_classifier,
    cache_frozen_prefix,
    fit_classifier,
    run_fingerprint,
    save_classifier,
)
from tlflax.loop import EpochCallback, History
from tlflax.metrics import classification_report
from tlflax.models.heads import Head
from tlflax.models.registry import create_backbone
from tlflax.plan import RunPlan, resolve_plan, resolve_taps
from tlflax.probes import features_by_depth
from tlflax.taps import joined_numpy, probe_taps
from tlflax.tasks import Task, class_probabilities, task_for
from tlflax.train import Forward, create_head, head_forward, train_head


def prepare_dataset(params: Params, dataset_dir: str | Path) -> Task:
    """Read ``params.prepare``'s source, draw train and validation from it, store the three
    splits in ``dataset_dir``, and return the :class:`~tlflax.tasks.Task` that reads them.

    Raises:
      DataError: the source is unreadable or laid out wrongly (naming the file or key).
      ParamsError: the backbone does not fit the data's modality.
    """
    _prepare_source(params.prepare, Path(dataset_dir))
    return task_for(params, Path(dataset_dir))


def open_dataset(params: Params, dataset_dir: str | Path) -> Task:
    """The :class:`~tlflax.tasks.Task` of a dataset :func:`prepare_dataset` stored before."""
    return task_for(params, Path(dataset_dir))


def backbone_for(params: Params, *, pretrained: bool | None = None) -> nnx.Module:
    """``extract.backbone`` (pretrained per ``extract.pretrained`` unless given), from
    ``extract.weights_path`` when set."""
    if params.extract.backbone == AUTO_BACKBONE:
        raise ParamsError(
            "'extract.backbone' is auto: the advice picks it; build from the chosen task's "
            "params (tlflax.api.chosen_task(task, advise(task)).params)"
        )
    if pretrained is None:
        pretrained = params.extract.pretrained
    backbone, _ = create_backbone(
        params.extract.backbone,
        pretrained=pretrained,
        weights_path=params.extract.weights_path,
        require_every_tensor=True,
        rngs=nnx.Rngs(params.finetune.seed),
    )
    return backbone


def advise(task: Task) -> Advice:
    """Probe the frozen backbone after every layer group on this data and recommend how to
    transfer: strategy, layer groups to train, schedule, and the depths the head reads.

    The probes fit on a stratified subset of train (``advise.max_train_examples``) and are
    scored on validation; see :func:`tlflax.advisor.recommend` for the rules. With
    ``extract.backbone: auto`` every candidate backbone is probed so, one is chosen by
    :func:`tlflax.backbone_choice.choose_backbone`, and the advice is the chosen one's, with
    the ranking in ``advice.backbone`` (:func:`chosen_task` gives its task).
    """
    params = task.params
    if params.extract.backbone != AUTO_BACKBONE:
        return _advise_backbone(task, backbone_for(params))
    one_example, _ = task.read_split("validation")
    candidates, advices = [], {}
    for name in candidate_backbones(params):
        candidate_task = task.with_backbone(name)
        backbone = backbone_for(candidate_task.params)
        advice = advices[name] = _advise_backbone(candidate_task, backbone)
        assert advice.taps is not None  # _advise_backbone always selects taps
        candidates.append(
            BackboneCandidate(
                name=name,
                probe_accuracy=advice.taps.validation_accuracy,
                taps=advice.taps.taps,
                best_depth_probe_accuracy=advice.evidence.best.validation_accuracy,
                flops_per_example=forward_flops(
                    backbone,
                    candidate_task.pooled_after_each_group,
                    candidate_task.model_inputs(one_example[:1]),
                ),
                parameters=parameter_count(backbone),
                validation_correct=advice.taps.validation_correct,
                validation_examples=advice.taps.validation_examples,
            )
        )
    choice = choose_backbone(candidates, params.advise)
    chosen = advices[choice.chosen]
    return dataclasses.replace(chosen, backbone=choice, reasons=(choice.reason(), *chosen.reasons))


def chosen_params(params: Params, advice: Advice) -> Params:
    """``params`` with the backbone the advice chose where ``extract.backbone`` is auto.

    Raises:
      MissingInputError: auto, but the advice was made for a written backbone.
    """

    def advised() -> str:
        if advice.backbone is None:
            raise MissingInputError(
                "extract.backbone is auto but the advice holds no choice of backbone: run the "
                "advise stage again with these params"
            )
        return advice.backbone.chosen

    return params.with_chosen_backbone(advised)


def chosen_task(task: Task, advice: Advice) -> Task:
    """``task`` with the backbone the advice chose where ``extract.backbone`` is auto."""
    params = chosen_params(task.params, advice)
    return task if params is task.params else task_for(params, task.dataset_dir)


def _advise_backbone(task: Task, backbone: nnx.Module) -> Advice:
    """The advice for ``task``'s written backbone (the body of :func:`advise`)."""
    records, labels = task.read_split("train")
    advice, _ = advise_on_inputs(
        task,
        backbone,
        labels,
        lambda probed: task.model_inputs(take(records, probed)),
        task.read_inputs("validation"),
        num_classes=len(task.class_names()),
    )
    return advice


def advise_on_inputs(
    task: Task,
    backbone: nnx.Module,
    train_labels: np.ndarray,
    probed_train_inputs: Callable[[np.ndarray], dict[str, np.ndarray]],
    validation: dict[str, np.ndarray],
    *,
    num_classes: int,
) -> tuple[Advice, dict[str, list[np.ndarray]]]:
    """The advice of :func:`advise` for ``backbone`` on data already in memory.

    Args:
      task: the task (its params and how its backbone is probed).
      backbone: the pretrained backbone to probe.
      train_labels: every training label.
      probed_train_inputs: model inputs (no labels) of the training examples at these
        indices; asked only for the probed subset, so a caller converts no more than that.
      validation: validation model inputs and ``label``.
      num_classes: number of classes.

    Returns:
      The advice with its taps, and the pooled features by depth of the probed training
      examples (``train``) and of ``validation``.
    """
    params, cfg = task.params, task.params.advise
    # A stratified subset: the probe's cost is bounded, the class balance kept.
    probed = at_most(train_labels, cfg.max_train_examples, seed=params.prepare.seed)
    evidence, features = measure(
        backbone,
        task.pooled_after_each_group,
        {**probed_train_inputs(probed), "label": train_labels[probed]},
        validation,
        num_classes=num_classes,
        batch_size=params.extract.batch_size,
        all_train_labels=train_labels,
        # Random-init features are the reference of "does pretraining help at all", asked
        # only where training from scratch is a candidate.
        random_init=(
            backbone_for(params, pretrained=False)
            if count_per_class(train_labels, num_classes) >= cfg.large_data_per_class
            else None
        ),
    )
    taps = probe_taps(
        features["train"],
        train_labels[probed],
        features["validation"],
        validation["label"],
        num_classes=num_classes,
        max_taps=cfg.max_taps,
        min_gain=cfg.min_tap_gain,
    )
    return dataclasses.replace(recommend(evidence, cfg), taps=taps), features


def head_taps(params: Params, advice: Advice) -> list[int] | None:
    """The depths the head reads: ``extract.taps`` decided with the advice (None: the
    backbone's final pooled features)."""
    return resolve_taps(
        params.extract.taps,
        None if advice.taps is None else advice.taps.taps,
        # The advice probed every layer group of this backbone: no model needs building.
        num_groups=advice.evidence.num_groups,
    )


def make_plan(task: Task, advice: Advice) -> RunPlan:
    """The advice and the params merged once: every setting of the fine-tuning run and of
    its from-scratch reference, decided (written params win over the advice)."""
    task = chosen_task(task, advice)
    params = task.params
    taps = head_taps(params, advice)
    train_labels = task.read_split("train")[1]
    return resolve_plan(
        params.finetune,
        params.train_scratch,
        advice,
        model=task.abstract_classifier(len(task.class_names()), taps),
        num_train_examples=len(train_labels),
        taps=taps,
        class_balance=training_class_balance(params, train_labels, task.class_names()),
    )


def extract_features(
    task: Task, backbone: nnx.Module, taps: Sequence[int] | None, inputs: dict[str, np.ndarray]
) -> np.ndarray:
    """The frozen ``backbone``'s features of ``inputs`` (:meth:`Task.read_inputs`) as the
    head reads them: the joined pooled outputs of ``taps``, or the final pooled features."""
    if taps is None:
        return task.extract_features(backbone, inputs, description="extract")
    by_depth = features_by_depth(
        backbone,
        task.pooled_after_each_group,
        {"inputs": inputs},
        batch_size=task.params.extract.batch_size,
    )["inputs"]
    return joined_numpy(by_depth, taps)


def _head_inputs(
    task: Task, backbone: nnx.Module, taps: Sequence[int] | None, split: str
) -> dict[str, np.ndarray]:
    inputs = task.read_inputs(split)
    return {"features": extract_features(task, backbone, taps, inputs), "label": inputs["label"]}


def train_new_head(
    task: Task,
    taps: Sequence[int] | None,
    backbone: nnx.Module | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
) -> tuple[Head, History]:
    """Feature extraction: a new head (``train_head``) trained on the frozen backbone's
    features of train, early-stopped on validation; ``on_epoch_end(epoch, metrics)`` sees
    each epoch as it ends."""
    backbone = backbone if backbone is not None else backbone_for(task.params)
    train, validation = (_head_inputs(task, backbone, taps, s) for s in ("train", "validation"))
    cfg = task.params.train_head
    balance = training_class_balance(task.params, train["label"], task.class_names())
    head = create_head(train["features"].shape[1], len(task.class_names()), cfg)
    return head, train_head(
        head, train, validation, cfg, balance=balance, on_epoch_end=on_epoch_end
    )


def initial_classifier(
    task: Task, plan: RunPlan, head: Head | None = None, *, scratch: bool = False
) -> nnx.Module:
    """The network a run of the plan starts from: the pretrained backbone cut at the plan's
    taps with ``head``'s weights on top, or - for the ``scratch`` strategy, or the plan's
    from-scratch reference with ``scratch`` - the same network from random weights."""
    cfg, num_classes = (plan.scratch if scratch else plan.finetune), len(task.class_names())
    if scratch or cfg.strategy == "scratch":
        return build_scratch_classifier(task, num_classes, cfg.seed, plan.head_taps)
    model = task.build_classifier(
        num_classes, pretrained=task.params.extract.pretrained, seed=cfg.seed, taps=plan.head_taps
    )
    if head is not None:
        nnx.update(model.head, nnx.state(head, nnx.Param))
    return model


def contrastive_stage(
    task: Task,
    plan: RunPlan,
    model: nnx.Module,
    train: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    *,
    scratch: bool = False,
) -> dict | None:
    """SetFit's first stage where the run's settings ask for it (``contrastive.pair_rounds``
    above 0; never in the plan's from-scratch run, ``scratch``): ``model``'s encoder tuned on
    pairs of ``train`` examples and a new head fitted on its features, in place
    (:mod:`tlflax.contrastive`). Returns what happened, or None where there is no such stage."""
    cfg = plan.scratch if scratch else plan.finetune
    if not cfg.contrastive.pair_rounds:
        return None
    return contrastive_start(
        model,
        train,
        validation,
        cfg.contrastive,
        task.params.train_head,
        batch_size=task.params.extract.batch_size,
        seed=cfg.seed,
        balance=plan.class_balance,
    )


def fine_tune(
    task: Task,
    plan: RunPlan,
    head: Head | None,
    *,
    checkpoint_dir: str | Path,
    scratch: bool = False,
    fingerprint: str | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Train by the plan - its fine-tuning, or with ``scratch`` its from-scratch reference -
    checkpointing every epoch in ``checkpoint_dir``: a killed run started again resumes
    there when its ``fingerprint`` (by default: params, plan, data, starting weights and
    tlflax's code) is the same. ``on_epoch_end(epoch, metrics)`` sees each epoch as it ends
    (a progress bar, a logger)."""
    cfg = plan.scratch if scratch else plan.finetune
    model = initial_classifier(task, plan, head, scratch=scratch)
    train, validation = task.read_inputs("train"), task.read_inputs("validation")
    contrastive_stage(task, plan, model, train, validation, scratch=scratch)
    if fingerprint is None:
        # What a checkpoint must match to be resumed: settings, data and starting weights.
        fingerprint = run_fingerprint([task.params, plan], train, validation, nnx.state(model))
    inputs = cache_frozen_prefix(
        task, model, cfg, train, validation, batch_size=task.params.extract.batch_size
    )
    return fit_classifier(
        model,
        inputs.forward,
        cfg,
        inputs.train,
        inputs.validation,
        checkpoint_dir=Path(checkpoint_dir),
        eval_batch_size=task.params.evaluate.batch_size,
        fingerprint=fingerprint,
        on_epoch_end=on_epoch_end,
        name="train_scratch" if scratch else "finetune",
        balance=plan.class_balance,
    )


def evaluate(
    task: Task, model: nnx.Module, cfg: FinetuneParams | None = None, split: str = "test"
) -> dict:
    """Accuracy, macro-F1, calibration and per-class scores of ``model`` on ``split``
    (predicting as ``cfg`` says: with its test-time augmentation)."""
    inputs = task.read_inputs(split)
    flip = cfg is not None and cfg.augment.test_time_flip
    forward = task.forward(test_time_flip=flip)
    probabilities = class_probabilities(model, forward, inputs, task.params.evaluate.batch_size)
    return classification_report(
        probabilities,
        inputs["label"],
        task.class_names(),
        calibration_bins=task.params.evaluate.calibration_bins,
    )


def load_classifier(task: Task, model_dir: str | Path) -> tuple[nnx.Module, Forward]:
    """The classifier :func:`save_classifier` wrote to ``model_dir`` and its inference
    forward pass (with the test-time augmentation it was validated with)."""
    return task.load_classifier(len(task.class_names()), Path(model_dir) / "model")


def predict(task: Task, model_dir: str | Path, records: Sequence | np.ndarray) -> np.ndarray:
    """Class probabilities (one row per record, columns in ``task.class_names()`` order) of
    the classifier saved in ``model_dir``: images as uint8 (N, H, W, C) at the dataset's
    stored size, or texts."""
    model, forward = load_classifier(task, model_dir)
    inputs = task.model_inputs(records)
    return class_probabilities(model, forward, inputs, task.params.evaluate.batch_size)


def run_transfer(params: Params, work_dir: str | Path) -> dict:
    """The whole run in ``work_dir``: prepare the dataset, advise, plan, train a new head,
    fine-tune by the plan, save the classifier (``work_dir/classifier``, read back by
    :func:`predict`) and evaluate it on test. Returns the test report, with the strategy
    that ran and the head-only model's test accuracy beside it."""
    work_dir = Path(work_dir)
    task = prepare_dataset(params, work_dir / "data")
    advice = advise(task)
    task = chosen_task(task, advice)
    params = task.params
    plan = make_plan(task, advice)
    backbone = backbone_for(params)
    head, _ = train_new_head(task, plan.head_taps, backbone)
    test = _head_inputs(task, backbone, plan.head_taps, "test")
    head_only = class_probabilities(head, head_forward, test, params.evaluate.batch_size)
    checkpoints = work_dir / "checkpoints"
    result = fine_tune(task, plan, head, checkpoint_dir=checkpoints)
    save_classifier(
        result.model, work_dir / "classifier", test_time_flip=plan.finetune.augment.test_time_flip
    )
    delete_checkpoints(checkpoints)
    report = evaluate(task, result.model, plan.finetune)
    report["strategy"] = plan.finetune.strategy
    report["head_only_accuracy"] = float(np.mean(head_only.argmax(axis=1) == test["label"]))
    return report

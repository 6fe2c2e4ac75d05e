"""Stage ``plan``: the advice and params.yaml merged once into the run's plan.

Reads the ``finetune`` and ``train_scratch`` sections and ``metrics/<experiment>/advice.json``
and writes ``metrics/<experiment>/plan.json`` (:class:`tlflax.plan.RunPlan`): every setting
of the fine-tuning run and of the from-scratch reference, decided, with the per-group
learning rates. ``finetune`` and ``train_scratch`` read only this file.
"""

from __future__ import annotations

import json

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.tasks import task_for
from tlflax.advisor import Advice
from tlflax.config import Params
from tlflax.errors import MissingInputError
from tlflax.io import write_json
from tlflax.plan import plan_table, resolve_plan


def run(params: Params, paths: ExperimentPaths) -> None:
    advice_file = paths.metrics("advice")
    if not advice_file.exists():
        raise MissingInputError(
            f"{advice_file} is missing: run the advise stage first (dvc repro advise); "
            "the plan's strategy and schedule come from it"
        )
    advice = Advice.from_json(json.loads(advice_file.read_text(encoding="utf-8")))
    task = task_for(params, paths)
    _, labels = task.read_split("train")
    plan = resolve_plan(
        params.finetune,
        params.train_scratch,
        advice,
        model=task.abstract_classifier(len(task.class_names())),
        num_train_examples=len(labels),
    )
    write_json(paths.metrics("plan"), plan.model_dump(mode="json"))
    print(f"plan ({paths.metrics('plan')}):\n{plan_table(plan)}")


if __name__ == "__main__":
    run_stage("plan", run)

"""Stage ``plan``: the advice and params.yaml merged once into the run's plan.

Reads the ``finetune`` and ``train_scratch`` sections, ``extract.taps`` and
``metrics/<experiment>/advice.json`` and writes ``metrics/<experiment>/plan.json``
(:class:`tlflax.plan.RunPlan`): the depths the head reads, and every setting of the
fine-tuning run and of the from-scratch reference, decided, with the per-group learning
rates. ``finetune`` and ``train_scratch`` build their models from this file (``extract``
resolves the same taps from the advice; a saved model's folder names its own).
"""

from __future__ import annotations

from pipelines.stages.common import ExperimentPaths, run_stage
from pipelines.stages.tasks import task_for
from tlflax.advisor import load_advice
from tlflax.config import Params
from tlflax.io import write_json
from tlflax.plan import plan_table, resolve_plan, resolve_taps


def run(params: Params, paths: ExperimentPaths) -> None:
    advice = load_advice(paths.metrics("advice"))
    task = task_for(params, paths)
    _, labels = task.read_split("train")
    num_classes = len(task.class_names())
    taps = resolve_taps(
        params.extract.taps,
        None if advice.taps is None else advice.taps.taps,
        # The advice probed every layer group of this backbone: no model needs building.
        num_groups=advice.evidence.num_groups,
    )
    plan = resolve_plan(
        params.finetune,
        params.train_scratch,
        advice,
        model=task.abstract_classifier(num_classes, taps),
        num_train_examples=len(labels),
        taps=taps,
    )
    write_json(paths.metrics("plan"), plan.model_dump(mode="json"))
    print(f"plan ({paths.metrics('plan')}):\n{plan_table(plan)}")


if __name__ == "__main__":
    run_stage("plan", run)

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
from tlflax.advisor import load_advice
from tlflax.api import make_plan
from tlflax.config import Params
from tlflax.io import write_json
from tlflax.plan import plan_table
from tlflax.tasks import task_for


def run(params: Params, paths: ExperimentPaths) -> None:
    plan = make_plan(task_for(params, paths.dataset_dir), load_advice(paths.metrics("advice")))
    write_json(paths.metrics("plan"), plan.model_dump(mode="json"))
    print(f"plan ({paths.metrics('plan')}):\n{plan_table(plan, params.prepare.modality)}")


if __name__ == "__main__":
    run_stage("plan", run)

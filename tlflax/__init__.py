"""tlflax: transfer learning and fine-tuning on JAX/Flax (the library; no Prefect, no DVC).

The public API, for a notebook or a script (the pipeline's stages call the same functions)::

    import tlflax

    params = tlflax.parse_params({"prepare": {"dataset": "image_folder", "raw_dir": "photos"}})
    report = tlflax.run_transfer(params, "work")   # prepare, advise, plan, head, fine-tune, test

or step by step: :func:`prepare_dataset`, :func:`advise`, :func:`make_plan`,
:func:`train_new_head`, :func:`fine_tune`, :func:`save_classifier`, :func:`evaluate`,
:func:`predict`. ``params`` has the schema of ``params.yaml`` (:class:`Params`): every
value has a default, and a wrong key or value stops with a :class:`ParamsError` naming it.

The names below load on first use: ``import tlflax.config`` (as the data stages do) does
not pay for JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Params": "tlflax.config",
    "parse_params": "tlflax.config",
    "load_params": "tlflax.config",
    "ParamsError": "tlflax.config",
    "InputError": "tlflax.errors",
    "DataError": "tlflax.data.errors",
    "backbone_names": "tlflax.models.registry",
    "Task": "tlflax.tasks",
    "Advice": "tlflax.advisor",
    "RunPlan": "tlflax.plan",
    "plan_table": "tlflax.plan",
    "FitResult": "tlflax.fit",
    "save_classifier": "tlflax.fit",
    "prepare_dataset": "tlflax.api",
    "open_dataset": "tlflax.api",
    "advise": "tlflax.api",
    "make_plan": "tlflax.api",
    "train_new_head": "tlflax.api",
    "fine_tune": "tlflax.api",
    "evaluate": "tlflax.api",
    "load_classifier": "tlflax.api",
    "predict": "tlflax.api",
    "run_transfer": "tlflax.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tlflax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

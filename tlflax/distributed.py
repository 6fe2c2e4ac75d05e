"""Training across processes and hosts with JAX's own multi-controller runtime.

Every process runs the same program (SPMD). :func:`initialize_from_environment` joins them
through ``jax.distributed.initialize``; from then on ``jax.devices()`` lists the devices of
every process, the fine-tuning mesh (:class:`tlflax.finetuner.Finetuner`) spans them all,
each process reads only its rows of every global batch
(:func:`tlflax.data.pipeline.iterate_batches` with :func:`process_shard`), and jit's
partitioner turns the step into one data-parallel program whose gradients are reduced
across processes. Orbax saves the training checkpoints collectively; the outputs that are
files (model folder, metrics, logs) are written by process 0 alone (:func:`is_writer`).

The processes meet as JAX's own variables say (as on a Kubernetes Indexed Job,
``infra/k8s/multihost-job.yaml``)::

    JAX_COORDINATOR_ADDRESS=host-of-process-0:1234  JAX_NUM_PROCESSES=2  JAX_PROCESS_ID=0|1

With ``JAX_NUM_PROCESSES`` unset or 1 nothing happens: one process, as always.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tlflax.errors import InputError

NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"


class DistributedSetupError(InputError):
    """The environment asks for several processes but does not say how they meet."""


def _integer(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={value!r}: set it to an integer "
            f"({NUM_PROCESSES} processes in all, {PROCESS_ID} this one's index from 0)"
        ) from None


def initialize_from_environment() -> bool:
    """Join the other processes when ``JAX_NUM_PROCESSES`` > 1; returns whether it did.

    Call before any other JAX call of the program. Blocks until every process has connected.

    Raises:
      DistributedSetupError: naming the environment variable that is missing or malformed.
    """
    if os.environ.get(NUM_PROCESSES, "1") in ("", "1"):
        return False
    count, index = _integer(NUM_PROCESSES), _integer(PROCESS_ID)
    if not 0 <= index < count:
        raise DistributedSetupError(
            f"environment variable {PROCESS_ID}={index}: must be in 0..{count - 1} "
            f"({NUM_PROCESSES}={count})"
        )
    if not os.environ.get(COORDINATOR_ADDRESS):
        raise DistributedSetupError(
            f"{NUM_PROCESSES}={count} but {COORDINATOR_ADDRESS} is not set: set it to "
            "host:port of process 0 (e.g. localhost:12355 for processes on one machine)"
        )
    if jax.distributed.is_initialized():
        return True
    # CPU processes exchange gradients through Gloo (GPUs use NCCL by themselves).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(num_processes=count, process_id=index)
    return True


def process_shard() -> tuple[int, int]:
    """``(this process's index, process count)``: which rows of a global batch it reads."""
    return jax.process_index(), jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; the only one when alone)."""
    return jax.process_index() == 0


def wait_for_all(name: str) -> None:
    """Block until every process reaches the barrier ``name``; nothing to wait for alone."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def put_replicated(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``tree`` on every device of ``sharding``, a whole copy on each.

    Alone, this is ``jax.device_put``. Across processes a device may belong to another
    process, so each process places its own host copy (every process holds the same values:
    the same seed built the same model) on its own devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> jax.Array:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            # Random keys have no host form: place their raw words, then wrap them again.
            words = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(words, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)

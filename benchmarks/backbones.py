"""Backbones on this CPU: tlflax (JAX/Flax) against eager PyTorch, same weights, batch and size.

    .venv/bin/python -m benchmarks.backbones

For EfficientNet-Lite0 (packaged ImageNet weights, depthwise convolutions on the CPU
"shifted" path) and MiniLM-L6 (packaged all-MiniLM-L6-v2 weights) it times

* the forward pass (inference: BatchNorm on running statistics, no dropout), and
* a train step: forward, backward and an SGD update of every parameter, with BatchNorm
  still in inference mode (the fine-tuning default) and no dropout, in both frameworks;

tlflax as one `jax.jit` over (graphdef, state) split once (the trainer's fast path),
PyTorch eager (`torch.set_num_threads(2)`) on the reference models of
`benchmarks.torch_reference`. The contenders take turns, so load from elsewhere on a
shared machine hits both alike; each time is the median of several repeats after a
warm-up, with compile time reported apart. FLOPs come from XLA's cost analysis of the
compiled tlflax programs and serve for both frameworks (same computation). The fp32 matmul
peak (a 2048² matmul in JAX) is the yardstick for the GFLOP/s reached.

Writes benchmarks/results/backbones.json: per model `forward_ratio` and `train_step_ratio`
(PyTorch time / tlflax time: above 1 means tlflax is faster), `gflops` (tlflax's train
step), the times behind them, and the settings.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from benchmarks.common import print_table, time_function, time_interleaved, write_results
from benchmarks.torch_reference import efficientnet_lite0, minilm_reference
from tlflax.models.efficientnet import EfficientNetLite0, imagenet_weights_path
from tlflax.models.efficientnet import load_pretrained as load_efficientnet
from tlflax.models.minilm import MiniLM, minilm_weights_path
from tlflax.models.minilm import load_pretrained as load_minilm
from tlflax.models.safetensors_weights import read_safetensors

THREADS = 2
WARMUP = 1
REPEATS = 7
IMAGE_BATCH, IMAGE_SIZE = 32, 96
TEXT_BATCH, SEQUENCE_LENGTH = 32, 128
LEARNING_RATE = 1e-5
MATMUL_SIZE = 2048


def _loss(outputs: Any) -> Any:
    """The same scalar in both frameworks (jax.Array and torch.Tensor share these operators)."""
    return (outputs**2).mean()


@dataclass
class Contender:
    """One framework's forward and train step on one model, ready to call."""

    forward: Callable[[], object]
    train_step: Callable[[], object]


@dataclass
class CompiledTlflax(Contender):
    """The tlflax contender, plus what compiling told us."""

    forward_gflop: float
    train_step_gflop: float
    compile_forward_s: float
    compile_train_step_s: float
    # The optimised HLO of the train step: names the ops a profile of it reports.
    train_step_hlo: str


def _compile(function: Callable, *args: Any, donate: Sequence[int] = ()) -> tuple[Any, float]:
    started = time.perf_counter()
    compiled = jax.jit(function, donate_argnums=tuple(donate)).lower(*args).compile()
    return compiled, time.perf_counter() - started


def _gflop(compiled: Any) -> float:
    return float(compiled.cost_analysis()["flops"]) / 1e9


def tlflax_contender(model: nnx.Module, inputs: Sequence[jax.Array]) -> CompiledTlflax:
    """Jitted forward and SGD train step over `model(*inputs)`, split once like the trainer."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.sgd(LEARNING_RATE)

    def forward(params, rest, *inputs):
        return nnx.merge(graphdef, params, rest)(*inputs)

    def train_step(params, opt_state, rest, *inputs):
        def loss_of(params):
            return _loss(nnx.merge(graphdef, params, rest)(*inputs))

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    compiled_forward, compile_forward_s = _compile(forward, params, rest, *inputs)
    # Donating params and optimizer state lets XLA update them in place, as a trainer does.
    compiled_step, compile_step_s = _compile(
        train_step, params, opt_state, rest, *inputs, donate=(0, 1)
    )
    state = [params, opt_state]

    def run_train_step() -> None:
        state[0], state[1], loss = compiled_step(state[0], state[1], rest, *inputs)
        jax.block_until_ready(loss)

    return CompiledTlflax(
        # The current parameters: the train step donates (frees) the ones it was given.
        forward=lambda: jax.block_until_ready(compiled_forward(state[0], rest, *inputs)),
        train_step=run_train_step,
        forward_gflop=_gflop(compiled_forward),
        train_step_gflop=_gflop(compiled_step),
        compile_forward_s=compile_forward_s,
        compile_train_step_s=compile_step_s,
        train_step_hlo=compiled_step.as_text(),
    )


def torch_contender(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Contender:
    """Eager forward (no autograd) and SGD train step; `eval()` keeps BatchNorm in inference."""
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model(*inputs)).backward()
        optimizer.step()

    return Contender(forward=forward, train_step=train_step)


def compare(name: str, ours: CompiledTlflax, peer: Contender, settings: dict) -> dict[str, Any]:
    """Times both contenders in turns; the results entry of one model."""
    entry: dict[str, Any] = dict(settings)
    for phase in ("forward", "train_step"):
        times = time_interleaved(
            {"tlflax": getattr(ours, phase), "torch": getattr(peer, phase)},
            warmup=WARMUP,
            repeats=REPEATS,
        )
        ours_s, peer_s = times["tlflax"]["median_s"], times["torch"]["median_s"]
        work = getattr(ours, f"{phase}_gflop")
        entry |= {
            f"{phase}_ratio": peer_s / ours_s,
            f"tlflax_{phase}_s": ours_s,
            f"torch_{phase}_s": peer_s,
            f"tlflax_{phase}_times_s": times["tlflax"]["times_s"],
            f"torch_{phase}_times_s": times["torch"]["times_s"],
            f"{phase}_gflop": work,
            f"tlflax_{phase}_gflops": work / ours_s,
            f"torch_{phase}_gflops": work / peer_s,
            f"compile_{phase}_s": getattr(ours, f"compile_{phase}_s"),
        }
        print(f"{name} {phase}: tlflax {ours_s:.3f} s, torch {peer_s:.3f} s", flush=True)
    entry["gflops"] = entry["tlflax_train_step_gflops"]
    return entry


@dataclass
class Workload:
    """One model in both frameworks, with the same weights and inputs."""

    model: nnx.Module
    inputs: list[jax.Array]
    reference: torch.nn.Module
    reference_inputs: list[torch.Tensor]
    settings: dict[str, Any]


def efficientnet_workload() -> Workload:
    """EfficientNet-Lite0 with its ImageNet classifier, on random images."""
    images = np.random.default_rng(0).random((IMAGE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    model = nnx.eval_shape(
        lambda: EfficientNetLite0(include_top=True, conv_impl="shifted", rngs=nnx.Rngs(0))
    )
    load_efficientnet(model)
    reference = efficientnet_lite0()
    reference.load_state_dict(torch.load(imagenet_weights_path(), weights_only=True))
    # The tlflax model normalises inside; the reference takes normalised NCHW input.
    normalised = torch.from_numpy((images * 255 - 127) / 128).permute(0, 3, 1, 2).contiguous()
    settings = {"batch": IMAGE_BATCH, "image_size": IMAGE_SIZE, "depthwise_impl": "shifted"}
    return Workload(model, [jnp.asarray(images)], reference, [normalised], settings)


def minilm_workload() -> Workload:
    """MiniLM-L6 sentence features on random token ids, a quarter to all of each row real."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (TEXT_BATCH, SEQUENCE_LENGTH)).astype(np.int32)
    lengths = rng.integers(SEQUENCE_LENGTH // 4, SEQUENCE_LENGTH + 1, TEXT_BATCH)
    mask = (np.arange(SEQUENCE_LENGTH) < lengths[:, None]).astype(np.int32)
    model = MiniLM(dropout_rate=0.0, rngs=nnx.Rngs(0))
    load_minilm(model)
    reference = minilm_reference(read_safetensors(minilm_weights_path()))
    settings = {"batch": TEXT_BATCH, "sequence_length": SEQUENCE_LENGTH}
    return Workload(
        model,
        [jnp.asarray(ids), jnp.asarray(mask)],
        reference,
        [torch.from_numpy(ids).long(), torch.from_numpy(mask)],
        settings,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "efficientnet_lite0": efficientnet_workload,
    "minilm": minilm_workload,
}


def entry(name: str) -> dict[str, Any]:
    """Both frameworks on the workload ``name``, timed in turns."""
    workload = WORKLOADS[name]()
    return compare(
        name,
        tlflax_contender(workload.model, workload.inputs),
        torch_contender(workload.reference, workload.reference_inputs),
        workload.settings,
    )


def matmul_peak_gflops() -> float:
    """fp32 GFLOP/s of a jitted MATMUL_SIZE² matmul: the most this CPU gives JAX."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.random((MATMUL_SIZE, MATMUL_SIZE), np.float32)) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    timing = time_function(lambda: jax.block_until_ready(matmul(a, b)), warmup=2, repeats=10)
    return 2 * MATMUL_SIZE**3 / timing["min_s"] / 1e9


def _warn_if_busy(load_average: float) -> None:
    # PyTorch's OpenMP threads wait for each other at every operation, so they lose far
    # more than XLA's task pool when other processes take the cores: on a busy machine
    # the ratios flatter tlflax (seen here: PyTorch 2-10x slower at a load of 3-7).
    if load_average > 0.5:
        print(
            f"warning: load average {load_average:.1f} before the run; other processes on "
            f"these {os.cpu_count()} cores make the ratios unreliable",
            flush=True,
        )


def main() -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    _warn_if_busy(load_before)
    torch.set_num_threads(THREADS)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s", flush=True)
    results = {
        **{name: entry(name) for name in WORKLOADS},
        "matmul_peak_gflops": peak,
        "settings": {
            "threads": THREADS,
            "warmup": WARMUP,
            "repeats": REPEATS,
            "statistic": "median",
            "jax": jax.__version__,
            "torch": torch.__version__,
            "device": jax.devices()[0].device_kind,
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
    }
    rows = [
        {
            "model": name,
            "phase": phase,
            "tlflax_s": results[name][f"tlflax_{phase}_s"],
            "torch_s": results[name][f"torch_{phase}_s"],
            "ratio": results[name][f"{phase}_ratio"],
            "tlflax_GFLOP/s": results[name][f"tlflax_{phase}_gflops"],
            "torch_GFLOP/s": results[name][f"torch_{phase}_gflops"],
            "compile_s": results[name][f"compile_{phase}_s"],
        }
        for name in ("efficientnet_lite0", "minilm")
        for phase in ("forward", "train_step")
    ]
    print()
    print_table(rows)
    print(
        f"\nmatmul peak {peak:.0f} GFLOP/s; EfficientNet-Lite0 batch {IMAGE_BATCH} @ "
        f"{IMAGE_SIZE} px; MiniLM batch {TEXT_BATCH} x {SEQUENCE_LENGTH} tokens; {THREADS} "
        f"threads; ratio = PyTorch / tlflax (> 1: tlflax faster)"
    )
    path = write_results("backbones", results)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""GPU readiness: one fine-tuning train step of every backbone on the accelerator, against the CPU.

    .venv/bin/python -m benchmarks.gpu_check [--backbones NAME ...] [--steps N] [--output PATH]
    .venv/bin/python -m benchmarks.gpu_check --cpu-as-accelerator --output /tmp/gpu_check.json

For each backbone the pipelines use, the classifier is built as its job builds it (the job's
params file, ``Task.build_classifier`` with the packaged pretrained weights, the task's
forward pass) and trained by a :class:`tlflax.finetuner.Finetuner` whose rules train every
group (strategy ``full``), batch 32 of seeded synthetic inputs. On the accelerator (the first
non-CPU JAX device) and on the CPU, under ``jax.default_matmul_precision("highest")`` (GPUs
otherwise multiply in TF32), it compares the inference logits of the batch, and the loss and
updated weights after ONE real jitted train step; then it times the step on both at the
default precision (median after warm-up). The CPU side runs the model as a CPU run of the
pipeline builds it (shifted depthwise convolutions). Results:
``benchmarks/results/gpu_check.json``; exit status 1 when a backbone fails its tolerances.

No accelerator visible: exit status 2, nothing written. ``--cpu-as-accelerator`` runs it
all with the CPU on both sides (to test the script), writing only to ``--output``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from benchmarks.common import RESULTS_DIR, print_table, time_interleaved
from tlflax.advisor import strategy_rules
from tlflax.config import load_params
from tlflax.data.pipeline import iterate_batches
from tlflax.finetuner import Finetuner
from tlflax.io import write_json
from tlflax.models.layers import DepthwiseConv2d
from tlflax.plan import TrainingPlan
from tlflax.sound import SAMPLE_RATE
from tlflax.tasks import Task, task_for
from tlflax.text import fixed_length_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZE = 32
SEED = 0
TEXT_LENGTH = 128
CLIP_SECONDS = 3.0  # the audio job's prepare.clip_seconds
SELF_CHECK = "cpu (self-check)"
TABLE_COLUMNS = ("backbone", "max_abs_logit_diff", "abs_loss_diff", "max_abs_param_diff")
TABLE_COLUMNS += ("update_relative_diff", "passes", "accelerator_ms_per_step")
TABLE_COLUMNS += ("accelerator_examples_per_s", "cpu_over_accelerator")

# Logits: max |Δlogit| / max(1, max |logit|); loss: |Δloss| / max(1, loss). Float32 on both
# sides, every product at full precision: what differs is the kernels' summation order
# (cuDNN/cuBLAS vs XLA:CPU). Weights: AdamW's first step moves each weight by
# lr * g / (|g| + eps), about ±lr whatever |g|, so a gradient that is zero up to rounding may
# take either sign on either device and a few weights rightly move opposite ways (max
# |Δparam| up to 2 lr: reported, not judged). Judged: ||update_acc - update_cpu|| /
# ||update_cpu||, about 2 sqrt(share of weights moved opposite ways) in that case.
# Measured on CPU (efficientnet_lite0, the step below): XLA's depthwise convolution against
# the shifted one, both float32 - relative Δlogit 1.2e-6, Δloss 9e-8, update 1.1e-4 (pass by
# 100x and more); the step in bfloat16 (8-bit mantissa; TF32's has 10) - Δloss 2.6e-3,
# update 0.51 (fail).
TOLERANCES = {"logit_relative": 1e-3, "loss_relative": 1e-3, "update_relative": 0.05}


@dataclass(frozen=True)
class Job:
    """Where a backbone's pipeline settings come from, and what its inputs look like."""

    params_file: str
    num_classes: int
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    description: str  # may name {image_size}, the job's extract.image_size


def _images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Fashion-MNIST's stored shape; the job's forward pass resizes to extract.image_size.
    return {"image": rng.integers(0, 256, (BATCH_SIZE, 28, 28, 1), dtype=np.uint8)}


def _tokens(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """[CLS] random WordPiece ids [SEP], then padding, at lengths 16-128."""
    tokenizer = fixed_length_tokenizer(TEXT_LENGTH)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    lengths = rng.integers(16, TEXT_LENGTH + 1, BATCH_SIZE)
    ids = rng.integers(1000, tokenizer.get_vocab_size(), (BATCH_SIZE, TEXT_LENGTH))
    mask = np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]
    ids[:, 0] = cls
    ids[np.arange(BATCH_SIZE), lengths - 1] = sep
    ids = np.where(mask, ids, tokenizer.token_to_id("[PAD]"))
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}


def _clips(rng: np.random.Generator) -> dict[str, np.ndarray]:
    samples = int(CLIP_SECONDS * SAMPLE_RATE)
    return {"audio": (0.1 * rng.standard_normal((BATCH_SIZE, samples))).astype(np.float32)}


_IMAGE_JOB = Job("params.yaml", 10, _images, "uint8 28x28x1 -> {image_size} px")
JOBS = {
    "efficientnet_lite0": _IMAGE_JOB,
    "efficientnet_lite1": _IMAGE_JOB,
    "efficientnet_lite2": _IMAGE_JOB,
    "minilm_l6": Job("experiments/text/params.yaml", 2, _tokens, f"{TEXT_LENGTH} tokens"),
    "musicnn_vgg": Job(
        "experiments/audio/params.yaml", 5, _clips, f"{CLIP_SECONDS:g} s at {SAMPLE_RATE} Hz"
    ),
}


@dataclass
class Side:
    """One device's program: the Finetuner's jitted step and the inference forward pass."""

    finetuner: Finetuner
    predict: Callable
    # Host copies of the starting point: every run gets fresh device buffers to donate.
    train_arguments: tuple
    inference_state: nnx.State


@dataclass(frozen=True)
class _HostKey:  # a random key's data off the device (NumPy holds no key dtype)
    data: np.ndarray
    impl: object


def _host(tree):
    def to_host(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # dropout keys of the model
            return _HostKey(np.array(jax.random.key_data(leaf)), jax.random.key_impl(leaf))
        return np.array(leaf)

    return jax.tree_util.tree_map(to_host, tree)


def _on(device: jax.Device, tree):
    """Fresh buffers of a host tree on ``device`` (the train step donates its inputs)."""

    def fresh(leaf):
        if isinstance(leaf, _HostKey):
            return jax.random.wrap_key_data(np.copy(leaf.data), impl=leaf.impl)
        return np.copy(leaf)

    return jax.device_put(jax.tree_util.tree_map(fresh, tree), device)


def full_plan(task: Task, model: nnx.Module, batch_size: int = BATCH_SIZE) -> TrainingPlan:
    """The job's finetune settings with every group training from the first step at peak
    rate (no warm-up: a first step at learning rate 0 would move nothing to compare)."""
    finetune = task.params.finetune
    patterns = model.backbone.group_patterns()
    settings = finetune.model_dump()
    settings.update(strategy="full", rules=strategy_rules("full", len(patterns), patterns))
    settings.update(unfreeze_groups=len(patterns), gradual_unfreezing=False, epochs=1)
    settings.update(batch_size=batch_size, warmup_fraction=0.0, cache_frozen_prefix=False)
    settings.update(layer_lr_decay=finetune.layer_lr_decay or 0.8)
    return TrainingPlan(**settings)


def _stand_in_head(model: nnx.Module, rng: np.random.Generator) -> None:
    """Seeded random head weights in place of train_head's trained head, which the finetune
    stage loads: the new head's zero output kernel would give zero logits and leave every
    backbone gradient zero, so the comparison would compare nothing."""

    def draw(weights: jax.Array) -> jax.Array:
        scale = 1 / np.sqrt(weights.shape[0]) if weights.ndim == 2 else 0.1
        return jnp.asarray(scale * rng.standard_normal(weights.shape), weights.dtype)

    nnx.update(model.head, jax.tree_util.tree_map(draw, nnx.state(model.head, nnx.Param)))


def _as_on_cpu(model: nnx.Module) -> nnx.Module:
    """The model a CPU run of the pipeline builds: its depthwise convolutions pick their
    implementation by the default backend when built (shifted multiply-adds on CPU, XLA's
    convolution elsewhere), so a model built beside a GPU would run XLA's on the CPU too."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, DepthwiseConv2d):
            module.impl = "shifted"
    return model


def _side(task: Task, model: nnx.Module, plan: TrainingPlan) -> Side:
    patterns = model.backbone.group_patterns()
    finetuner = Finetuner(
        model, task.forward(plan), plan, num_train_examples=10 * BATCH_SIZE, group_patterns=patterns
    )
    state = finetuner.initial
    graphdef, inference_state = nnx.split(finetuner.model(state))
    forward = task.forward()

    @jax.jit
    def predict(state, batch):
        return forward(nnx.merge(graphdef, state), batch, False, None)

    arguments = _host((state.trainable, state.opt_state, state.frozen, state.rest))
    return Side(finetuner, predict, arguments, _host(inference_state))


def build_sides(name: str) -> tuple[Side, Side, dict, str]:
    """(accelerator side, CPU side, the batch, the input description) for ``name``."""
    job = JOBS[name]
    params = load_params(ROOT / job.params_file).with_backbone(name)
    task = task_for(params, ROOT / "data")  # builds models only: the data is never read
    model = task.build_classifier(job.num_classes, pretrained=True, seed=SEED)
    plan = full_plan(task, model)
    rng = np.random.default_rng(SEED)
    _stand_in_head(model, rng)
    arrays = {**job.inputs(rng), "label": rng.integers(0, job.num_classes, BATCH_SIZE)}
    batch = next(iterate_batches(arrays, BATCH_SIZE, shuffle=False, seed=SEED))
    description = job.description.format(image_size=params.extract.image_size)
    if jax.default_backend() == "cpu":  # the same program on both sides: compile it once
        side = _side(task, model, plan)
        return side, side, batch, description
    cpu_side = _side(task, _as_on_cpu(model), plan)
    return _side(task, model, plan), cpu_side, batch, description


def _train_once(side: Side, device: jax.Device, batch: dict) -> tuple[nnx.State, float]:
    trainable, opt_state, frozen, rest = _on(device, side.train_arguments)
    key = jax.device_put(jax.random.key(SEED), device)
    trainable, _, _, loss = side.finetuner.train_step(
        trainable, opt_state, frozen, rest, _on(device, batch), key
    )
    return _host(trainable), float(loss)


def _weight_differences(start, accelerator, cpu) -> tuple[float, float]:
    """max |weight on the accelerator - on the CPU| after the step, and
    ||update on the accelerator - update on the CPU|| / ||update on the CPU||."""
    leaves = (jax.tree_util.tree_leaves(tree) for tree in (start, accelerator, cpu))
    largest = apart = moved = 0.0
    for first, on_accelerator, on_cpu in zip(*leaves, strict=True):
        largest = max(largest, float(np.max(np.abs(on_accelerator - on_cpu), initial=0.0)))
        apart += float(np.sum((on_accelerator - on_cpu) ** 2))
        moved += float(np.sum((on_cpu - first) ** 2))
    return largest, float(np.sqrt(apart / moved)) if moved else float(np.sqrt(apart))


def compare(accelerator: jax.Device, sides: tuple[Side, Side], batch: dict) -> dict:
    """Logits, loss and updated weights of the same batch on both devices, at full precision."""
    on_accelerator, on_cpu = sides
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        logits = [
            np.asarray(side.predict(_on(device, side.inference_state), _on(device, batch)))
            for side, device in ((on_accelerator, accelerator), (on_cpu, cpu))
        ]
        trained_accelerator, loss_accelerator = _train_once(on_accelerator, accelerator, batch)
        trained_cpu, loss_cpu = _train_once(on_cpu, cpu, batch)
    logit_scale = max(1.0, float(np.max(np.abs(logits[1]))))
    largest, relative = _weight_differences(
        on_cpu.train_arguments[0], trained_accelerator, trained_cpu
    )
    row = {
        "max_abs_logit_diff": float(np.max(np.abs(logits[0] - logits[1]))),
        "logit_limit": TOLERANCES["logit_relative"] * logit_scale,
        "loss_cpu": loss_cpu,
        "abs_loss_diff": abs(loss_accelerator - loss_cpu),
        "loss_limit": TOLERANCES["loss_relative"] * max(1.0, abs(loss_cpu)),
        "max_abs_param_diff": largest,
        "update_relative_diff": relative,
        "update_limit": TOLERANCES["update_relative"],
    }
    row["passes"] = bool(
        row["max_abs_logit_diff"] <= row["logit_limit"]
        and row["abs_loss_diff"] <= row["loss_limit"]
        and row["update_relative_diff"] <= row["update_limit"]
    )
    return row


def _step_closure(side: Side, device: jax.Device, batch: dict) -> Callable[[], None]:
    """One train step per call, carrying its state, as an epoch of the pipeline does."""
    trainable, opt_state, frozen, rest = _on(device, side.train_arguments)
    carried = {"state": (trainable, opt_state, rest)}
    batch, key = _on(device, batch), jax.device_put(jax.random.key(SEED), device)
    # XLA:CPU multiplies float32 in full whatever the precision asked (the same loss and
    # weights bit for bit at both): a CPU step reuses the comparison's compiled program.
    precision = "highest" if device.platform == "cpu" else None

    def step() -> None:
        trainable, opt_state, rest = carried["state"]
        with jax.default_matmul_precision(precision):
            trainable, opt_state, rest, loss = side.finetuner.train_step(
                trainable, opt_state, frozen, rest, batch, key
            )
        carried["state"] = (trainable, opt_state, rest)
        jax.block_until_ready(loss)

    return step


def time_steps(accelerator: jax.Device, sides: tuple[Side, Side], batch: dict, steps: int) -> dict:
    """Median train-step time on each device, taking turns, at the default precision (where
    it differs from full precision: GPUs multiply in TF32 by default)."""
    cpu = jax.devices("cpu")[0]
    functions = {
        "accelerator": _step_closure(sides[0], accelerator, batch),
        "cpu": _step_closure(sides[1], cpu, batch),
    }
    # One warm-up call: it compiles (and on a GPU autotunes); the median absorbs the rest.
    times = time_interleaved(functions, warmup=1, repeats=steps)
    medians = {name: times[name]["median_s"] for name in functions}
    return {
        "accelerator_ms_per_step": 1e3 * medians["accelerator"],
        "accelerator_examples_per_s": BATCH_SIZE / medians["accelerator"],
        "cpu_ms_per_step": 1e3 * medians["cpu"],
        "cpu_examples_per_s": BATCH_SIZE / medians["cpu"],
        "cpu_over_accelerator": medians["cpu"] / medians["accelerator"],
    }


def check_backbone(name: str, accelerator: jax.Device, steps: int) -> dict:
    started = time.perf_counter()
    on_accelerator, on_cpu, batch, description = build_sides(name)
    row = {"backbone": name, "inputs": f"{BATCH_SIZE} x {description}"}
    row.update(compare(accelerator, (on_accelerator, on_cpu), batch))
    row.update(time_steps(accelerator, (on_accelerator, on_cpu), batch, steps))
    row["check_seconds"] = time.perf_counter() - started
    return row


def pinned_jax_version() -> str:
    """The jax version requirements.lock pins (this jax's when the lock does not say)."""
    lock = ROOT / "requirements.lock"
    text = lock.read_text(encoding="utf-8") if lock.exists() else ""
    match = re.search(r"^jax==([^\s;]+)", text, flags=re.MULTILINE)
    return match.group(1) if match else jax.__version__


def find_accelerator(cpu_as_accelerator: bool) -> jax.Device | None:
    if cpu_as_accelerator:
        return jax.devices("cpu")[0]
    return next((device for device in jax.devices() if device.platform != "cpu"), None)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per device")
    output_help = "results file (default: benchmarks/results/gpu_check.json, not in a self-check)"
    parser.add_argument("--output", type=Path, help=output_help)
    self_check_help = "run the whole check with the CPU on both sides (tests the script)"
    parser.add_argument("--cpu-as-accelerator", action="store_true", help=self_check_help)
    arguments = parser.parse_args()
    if arguments.steps < 1:
        parser.error("--steps must be at least 1")
    return arguments


def main() -> None:
    arguments = _arguments()
    accelerator = find_accelerator(arguments.cpu_as_accelerator)
    if accelerator is None:
        print(
            f"gpu_check: error: no accelerator is visible to JAX (jax.devices() returned "
            f"{jax.devices()}); on a machine with an NVIDIA GPU install a CUDA jaxlib, "
            f'pip install "jax[cuda12]=={pinned_jax_version()}", or pass '
            "--cpu-as-accelerator to self-check this script on the CPU",
            file=sys.stderr,
        )
        sys.exit(2)
    started = time.perf_counter()
    rows = [check_backbone(name, accelerator, arguments.steps) for name in arguments.backbones]
    results = {
        "accelerator": SELF_CHECK if arguments.cpu_as_accelerator else accelerator.device_kind,
        "platform": accelerator.platform,
        "device_kind": accelerator.device_kind,
        "cpu_device_kind": jax.devices("cpu")[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "settings": dict(batch_size=BATCH_SIZE, timed_steps=arguments.steps, seed=SEED),
        "precision": {"comparison": "highest", "timing": "default"},
        "tolerances": TOLERANCES,
        "rows": rows,
        "passes": all(row["passes"] for row in rows),
        "check_seconds": time.perf_counter() - started,
    }
    print_table([{column: row[column] for column in TABLE_COLUMNS} for row in rows])
    output = arguments.output
    if output is None and not arguments.cpu_as_accelerator:
        output = RESULTS_DIR / "gpu_check.json"
    if output is not None:
        write_json(output, results)
        print(f"wrote {output}")
    sys.exit(0 if results["passes"] else 1)


if __name__ == "__main__":
    main()

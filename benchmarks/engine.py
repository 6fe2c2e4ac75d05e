"""Transfer-engine benchmark: cached features, frozen-layer savings, one compile per step.

    .venv/bin/python -m benchmarks.engine

Measures on EfficientNet-Lite0 (ImageNet weights, 64 px, batch 32, this machine's CPU):
  * cached_head_epoch_speedup - a head-training epoch through the frozen backbone divided by
    the same epoch on cached features;
  * frozen75_step_speedup - a full fine-tuning step divided by a step with the bottom 75% of
    the layer groups frozen (gradients of frozen weights are never computed);
  * frozen75_peak_memory_ratio - XLA's peak buffer memory of the full step over the frozen one;
  * compiles_per_step_function - compilations of each jitted step over a two-epoch run whose
    last batch is padded.
Above 1 means the fast path wins. Results go to benchmarks/results/engine.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from benchmarks.common import print_table, time_interleaved, write_results
from tlflax.config import AugmentParams, FinetuneParams, TrainHeadParams, TransferRule
from tlflax.data.pipeline import iterate_batches, prepare_images
from tlflax.finetuner import Finetuner
from tlflax.models.heads import Head
from tlflax.train import masked_cross_entropy
from tlflax.vision import build_image_classifier, extract_features, image_forward

IMAGE_SIZE = 64
BATCH_SIZE = 32
EXAMPLES = 320
FROZEN_FRACTION = 0.75


def _images(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, count).astype(np.int64),
    }


def _finetuner(freeze_groups: int, num_train_examples: int) -> Finetuner:
    model = build_image_classifier(
        "efficientnet_lite0", 10, TrainHeadParams(), pretrained=True, seed=0
    )
    patterns = model.backbone.group_patterns()
    rules = [TransferRule(pattern="^head/")]
    rules += [
        TransferRule(pattern="^backbone/" + pattern.lstrip("^"), freeze=True)
        for pattern in patterns[:freeze_groups]
    ]
    rules.append(TransferRule(pattern=".*"))
    cfg = FinetuneParams(rules=rules, batch_size=BATCH_SIZE, epochs=2, augment=AugmentParams())
    return Finetuner(
        model,
        image_forward(IMAGE_SIZE, cfg.augment),
        cfg,
        num_train_examples=num_train_examples,
        group_patterns=patterns,
    )


def _compiled_step(finetuner: Finetuner, batch: dict) -> tuple[Callable[[], None], int]:
    """A timed-step closure and XLA's peak buffer bytes (arguments + outputs + temporaries)."""
    state = finetuner.initial
    arguments = (state.trainable, state.opt_state, state.frozen, state.rest, batch, state.key)
    compiled = finetuner.train_step.lower(*arguments).compile()
    memory = compiled.memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    carried = {"state": (state.trainable, state.opt_state, state.rest)}

    def step() -> None:
        trainable, opt_state, rest = carried["state"]
        trainable, opt_state, rest, loss = compiled(
            trainable, opt_state, state.frozen, rest, batch, state.key
        )
        carried["state"] = (trainable, opt_state, rest)
        jax.block_until_ready(loss)

    return step, peak


def frozen_step_comparison() -> dict:
    batch = next(iterate_batches(_images(BATCH_SIZE), BATCH_SIZE, shuffle=False, seed=0))
    full = _finetuner(0, 10 * BATCH_SIZE)
    groups = len(_group_patterns())
    frozen_groups = round(FROZEN_FRACTION * groups)
    frozen = _finetuner(frozen_groups, 10 * BATCH_SIZE)
    full_step, full_peak = _compiled_step(full, batch)
    frozen_step, frozen_peak = _compiled_step(frozen, batch)
    # Interleaved (full, frozen, full, ...) so machine noise hits both alike.
    times = time_interleaved({"full": full_step, "frozen": frozen_step}, warmup=1, repeats=5)
    full_time, frozen_time = times["full"], times["frozen"]
    frozen_parameters = sum(
        size for name, size in frozen.sizes.items() if frozen.settings[name].frozen
    )
    return {
        "frozen_groups": f"{frozen_groups} of {groups}",
        "frozen_parameter_fraction": frozen_parameters / sum(frozen.sizes.values()),
        "full_step_s": full_time["median_s"],
        "frozen75_step_s": frozen_time["median_s"],
        "frozen75_step_speedup": full_time["median_s"] / frozen_time["median_s"],
        "full_peak_bytes": full_peak,
        "frozen75_peak_bytes": frozen_peak,
        "frozen75_peak_memory_ratio": full_peak / frozen_peak,
    }


def _group_patterns() -> list[str]:
    model = nnx.eval_shape(
        lambda: build_image_classifier(
            "efficientnet_lite0", 10, TrainHeadParams(), pretrained=False
        )
    )
    return model.backbone.group_patterns()


def cached_head_comparison() -> dict:
    """One head-training epoch through the frozen backbone vs on cached features."""
    data = _images(EXAMPLES)
    model = build_image_classifier("efficientnet_lite0", 10, TrainHeadParams(), pretrained=True)
    backbone_graph, backbone_state = nnx.split(model.backbone)
    head = Head(model.backbone.feature_dim, 10, rngs=nnx.Rngs(0))
    head_graph, head_params = nnx.split(head, nnx.Param)

    def head_loss(head_params, features, batch):
        logits = nnx.merge(head_graph, head_params)(features)
        return masked_cross_entropy(logits, batch["label"], batch["mask"])

    @jax.jit
    def step_through_backbone(head_params, backbone_state, batch):
        backbone = nnx.merge(backbone_graph, backbone_state)
        features = backbone.features(prepare_images(batch["image"], IMAGE_SIZE), train=False)
        grads = jax.grad(head_loss)(head_params, features, batch)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, head_params, grads)

    @jax.jit
    def step_on_features(head_params, batch):
        grads = jax.grad(head_loss)(head_params, batch["features"], batch)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, head_params, grads)

    features = extract_features(
        model.backbone, data["image"], image_size=IMAGE_SIZE, batch_size=BATCH_SIZE
    )
    cached = {"features": features, "label": data["label"]}

    def epoch_through_backbone() -> None:
        params = head_params
        for batch in iterate_batches(data, BATCH_SIZE, shuffle=True, seed=0):
            params = step_through_backbone(params, backbone_state, batch)
        jax.block_until_ready(params)

    def epoch_on_features() -> None:
        params = head_params
        for batch in iterate_batches(cached, BATCH_SIZE, shuffle=True, seed=0):
            params = step_on_features(params, batch)
        jax.block_until_ready(params)

    times = time_interleaved(
        {"through": epoch_through_backbone, "cached": epoch_on_features}, warmup=1, repeats=3
    )
    through, on_cache = times["through"], times["cached"]
    return {
        "epoch_through_backbone_s": through["median_s"],
        "epoch_on_cached_features_s": on_cache["median_s"],
        "cached_head_epoch_speedup": through["median_s"] / on_cache["median_s"],
    }


def compile_count() -> dict:
    """Compilations per step function over two epochs whose last batch is padded."""
    data = _images(EXAMPLES + BATCH_SIZE // 2, seed=1)
    finetuner = _finetuner(14, len(data["label"]))
    state = finetuner.initial
    for _ in range(2):
        state, _ = finetuner.run_epoch(state, data, progress=False)
        finetuner.evaluate(state, data, BATCH_SIZE)
    counts = {
        "train_step": finetuner.train_step._cache_size(),
        "eval_step": finetuner.eval_step._cache_size(),
    }
    return {"compiles": counts, "compiles_per_step_function": max(counts.values())}


def main() -> None:
    started = time.perf_counter()
    results = {
        "settings": {
            "backbone": "efficientnet_lite0",
            "image_size": IMAGE_SIZE,
            "batch_size": BATCH_SIZE,
            "examples_per_epoch": EXAMPLES,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
        }
    }
    results.update(cached_head_comparison())
    results.update(frozen_step_comparison())
    results.update(compile_count())
    results["benchmark_seconds"] = time.perf_counter() - started
    write_results("engine", results)
    targets = {
        "cached_head_epoch_speedup": ">= 50",
        "frozen75_step_speedup": ">= 2",
        "frozen75_peak_memory_ratio": "> 1",
        "compiles_per_step_function": "== 1",
    }
    print_table(
        [
            {"measure": key, "value": results[key], "target": target}
            for key, target in targets.items()
        ]
    )


if __name__ == "__main__":
    main()

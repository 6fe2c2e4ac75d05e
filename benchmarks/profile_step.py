"""Where the time of a tlflax train step goes: a profile of the jitted step, by kind of op.

    .venv/bin/python -m benchmarks.profile_step minilm
    .venv/bin/python -m benchmarks.profile_step efficientnet_lite0 --top 30

Compiles the train step of ``benchmarks.backbones`` (same model, batch and SGD update),
traces a few steps with ``jax.profiler`` and sums the time of every compiled op over them.
Ops are grouped by what the optimised HLO says they come from (its ``op_name``: ``jvp()``
is the forward pass, ``transpose(jvp())`` the backward pass) and by output shape, and
matrix products get their GFLOP/s. XLA's CPU runtime runs independent ops at the same time,
so the summed op time can exceed the wall time of a step; two products that share the
cores each look slower than they would alone.

Prints the table and writes benchmarks/results/profile_<model>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax

from benchmarks.backbones import WORKLOADS, tlflax_contender
from benchmarks.common import print_table, write_results

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DOT = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), .*?"
    r"lhs_contracting_dims=\{([\d,]*)\}"
)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\) -> .* \{$")


def _dims(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _computations(hlo: str) -> dict[str, list[str]]:
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line):
            current = bodies.setdefault(match.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


def _shapes(lines: list[str]) -> dict[str, list[int]]:
    return {
        match.group(1): _dims(match.group(2).split("[")[1].rstrip("]"))
        for line in lines
        if (match := _INSTRUCTION.match(line))
    }


def _dot_flops(lines: list[str], shapes: dict[str, list[int]]) -> float:
    """FLOPs of the dot instructions among ``lines`` (2 x output size x contracted size)."""
    flops = 0.0
    for line in lines:
        if match := _DOT.match(line):
            operand = shapes.get(match.group(2), [])
            contracted = math.prod(operand[d] for d in _dims(match.group(3)) if d < len(operand))
            flops += 2.0 * math.prod(_dims(match.group(1))) * contracted
    return flops


def hlo_ops(hlo: str) -> dict[str, dict[str, Any]]:
    """Every instruction of the optimised HLO: its output shape, source op and dot FLOPs."""
    bodies = _computations(hlo)
    every_shape = _shapes(hlo.splitlines())
    ops = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        source = _OP_NAME.search(line)
        called = _CALLS.search(line)
        lines = bodies.get(called.group(1), []) if called else [line]
        ops[match.group(1)] = {
            "shape": match.group(2),
            "source": source.group(1).split("/", 1)[-1] if source else "",
            # A fusion's dot reads its parameters; an unfused one reads other instructions.
            "flops": _dot_flops(lines, _shapes(lines) if called else every_shape),
        }
    return ops


def _trace_events(directory: Path) -> list[dict[str, Any]]:
    (path,) = directory.rglob("*.trace.json.gz")
    with gzip.open(path) as file:
        return [event for event in json.load(file)["traceEvents"] if event.get("ph") == "X"]


def profile(name: str, steps: int) -> dict[str, Any]:
    """Per kind of op: milliseconds per step (and GFLOP/s for matrix products)."""
    workload = WORKLOADS[name]()
    contender = tlflax_contender(workload.model, workload.inputs)
    ops = hlo_ops(contender.train_step_hlo)
    for _ in range(2):
        contender.train_step()
    with tempfile.TemporaryDirectory(prefix="tlflax-profile-") as directory:
        jax.profiler.start_trace(directory)
        started = time.perf_counter()
        for _ in range(steps):
            contender.train_step()
        wall_s = (time.perf_counter() - started) / steps
        jax.profiler.stop_trace()
        events = _trace_events(Path(directory))
    groups: dict[tuple[str, str], dict[str, float]] = defaultdict(
        lambda: {"us": 0.0, "flops": 0.0, "count": 0}
    )
    for event in events:
        op = ops.get(event["name"])
        if op is None:  # runtime bookkeeping, Python frames
            continue
        group = groups[(op["source"], op["shape"])]
        group["us"] += event["dur"]
        group["flops"] += op["flops"]
        group["count"] += 1
    rows = [
        {
            "source": source or "(no op_name)",
            "shape": shape,
            "ms_per_step": values["us"] / 1e3 / steps,
            "ops_per_step": values["count"] / steps,
            "GFLOP/s": values["flops"] / values["us"] / 1e3 if values["flops"] else None,
        }
        for (source, shape), values in groups.items()
    ]
    rows.sort(key=lambda row: -row["ms_per_step"])
    return {
        "model": name,
        "settings": workload.settings,
        "steps": steps,
        "wall_s_per_step": wall_s,
        "op_ms_per_step": sum(row["ms_per_step"] for row in rows),
        "matmul_ms_per_step": sum(row["ms_per_step"] for row in rows if row["GFLOP/s"]),
        "groups": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=3, help="train steps traced")
    parser.add_argument("--top", type=int, default=25, help="rows printed")
    args = parser.parse_args()
    result = profile(args.model, args.steps)
    print_table(result["groups"][: args.top])
    print(
        f"\n{args.model}: {result['wall_s_per_step']:.3f} s per step (traced); op time "
        f"{result['op_ms_per_step']:.0f} ms per step, of which matrix products "
        f"{result['matmul_ms_per_step']:.0f} ms"
    )
    path = write_results(f"profile_{args.model}", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

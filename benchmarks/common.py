"""Timing, results files and tables shared by the benchmarks.

Timed callables must be synchronous: wrap a JAX call in `jax.block_until_ready`, else the
clock stops at dispatch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tlflax.io import write_json

__all__ = ["RESULTS_DIR", "print_table", "time_function", "time_interleaved", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _summary(times: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "mean_s": statistics.fmean(times),
        "repeats": len(times),
        "times_s": list(times),
    }


def time_interleaved(
    functions: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, dict[str, Any]]:
    """Times several functions in turns (a, b, a, b, ...), after `warmup` untimed calls each.

    Taking turns matters on a shared machine: a burst of load from elsewhere then slows
    every contender in the same round instead of whichever happened to be running.

    Returns:
      name → {median_s, min_s, max_s, mean_s, repeats, times_s}.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: _summary(samples) for name, samples in times.items()}


def time_function(
    function: Callable[[], object], *, warmup: int = 1, repeats: int = 5
) -> dict[str, Any]:
    """Times `function` `repeats` times after `warmup` untimed calls; see `time_interleaved`."""
    return time_interleaved({"function": function}, warmup=warmup, repeats=repeats)["function"]


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Writes `payload` to `benchmarks/results/<name>.json` atomically; returns the path."""
    path = RESULTS_DIR / f"{name}.json"
    write_json(path, dict(payload))
    return path


def print_table(rows: Sequence[Mapping[str, object]]) -> None:
    """Prints dicts with the same keys as an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

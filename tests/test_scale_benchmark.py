"""benchmarks.scale end to end at tiny sizes: real stores, real extraction and epochs, each
measured in its own process, written in ../shared/MEASURE.md's item-9 format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = [sys.executable, "-m", "benchmarks.scale"]


@pytest.mark.slow
def test_the_scale_benchmark_measures_both_sizes(tmp_path: Path):
    output = tmp_path / "scale.json"
    result = subprocess.run(
        # 32 px: the same code paths as 64 px, with cheaper steps (76 s here against 98 s).
        [*BENCHMARK, "--sizes", "64", "96", "--image-size", "32", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {"64", "96", "epoch_peak_rss_ratio"}
    for size in ("64", "96"):
        row = results[size]
        for key in ("extract_peak_rss_mb", "extract_s", "epoch_peak_rss_mb", "epoch_s"):
            assert row[key] > 0, (size, key)
        # A process that ran JAX and a backbone holds hundreds of MB.
        assert row["epoch_peak_rss_mb"] > 200 and row["extract_peak_rss_mb"] > 200
    # The peer (the split read whole first) is measured at the largest size only.
    assert "epoch_in_memory_peak_rss_mb" in results["96"]
    assert "epoch_in_memory_peak_rss_mb" not in results["64"]
    ratio = results["96"]["epoch_peak_rss_mb"] / results["64"]["epoch_peak_rss_mb"]
    assert results["epoch_peak_rss_ratio"] == pytest.approx(ratio, abs=1e-3)


def test_the_scale_benchmark_refuses_one_size():
    result = subprocess.run(
        [*BENCHMARK, "--sizes", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--sizes: give two or more different positive sizes" in result.stderr

"""The GPU readiness check (benchmarks/gpu_check.py), run for real with the CPU on both sides.

This machine has no GPU: the self-check (--cpu-as-accelerator) runs every code path of the
comparison and the timing, and without the flag the script must refuse in one line.
"""

from __future__ import annotations

import json
import math
import re
import sys

import jax
import pytest

from benchmarks.gpu_check import RESULTS_DIR
from tests.conftest import ROOT, run

pytestmark = pytest.mark.skipif(
    any(device.platform != "cpu" for device in jax.devices()),
    reason="an accelerator is visible: run python -m benchmarks.gpu_check itself",
)


def _gpu_check(*arguments: str):
    return run([sys.executable, "-m", "benchmarks.gpu_check", *arguments], cwd=ROOT, timeout=300)


def test_self_check_compares_and_times_one_train_step(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = _gpu_check(
        "--cpu-as-accelerator", "--backbones", "efficientnet_lite0", "--steps", "1",
        "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(output.read_text())
    assert results["accelerator"] == "cpu (self-check)"
    assert results["platform"] == "cpu"
    assert results["jax"] == jax.__version__
    assert results["passes"] is True
    (row,) = results["rows"]
    assert row["backbone"] == "efficientnet_lite0"
    assert row["inputs"] == "32 x uint8 28x28x1 -> 64 px"
    # The same compiled program on the same device: the differences are exactly zero.
    for key in ("max_abs_logit_diff", "abs_loss_diff", "max_abs_param_diff"):
        assert row[key] == 0.0, key
    assert row["update_relative_diff"] == 0.0
    assert row["passes"] is True
    # The stand-in head gives real logits: not the ln(10) loss of a zero head's zero logits.
    assert row["loss_cpu"] > 0
    assert row["loss_cpu"] != pytest.approx(math.log(10), abs=1e-3)
    for key in ("accelerator_ms_per_step", "cpu_ms_per_step"):
        assert row[key] > 0, key
    assert row["accelerator_examples_per_s"] == pytest.approx(32e3 / row["accelerator_ms_per_step"])
    assert row["cpu_over_accelerator"] > 0
    assert "efficientnet_lite0" in result.stdout  # the printed table


def test_without_an_accelerator_it_exits_2_in_one_line_and_writes_nothing():
    results_file = RESULTS_DIR / "gpu_check.json"
    before = results_file.stat().st_mtime_ns if results_file.exists() else None
    result = _gpu_check("--backbones", "efficientnet_lite0")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "no accelerator is visible to JAX" in line
    assert "CpuDevice" in line  # what jax.devices() returned
    pinned = re.search(r"^jax==(\S+)$", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    assert f'pip install "jax[cuda12]=={pinned.group(1)}"' in line
    after = results_file.stat().st_mtime_ns if results_file.exists() else None
    assert after == before

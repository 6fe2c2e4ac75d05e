"""The public Python API: the README's example run as written, and what `import tlflax` is."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RAW_FASHION_MNIST, ROOT


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section shows one complete example"
    return blocks[0]


def test_import_tlflax_brings_no_orchestration_and_every_public_name_resolves() -> None:
    code = (
        "import sys, json, pkgutil, importlib, tlflax\n"
        "light = 'jax' not in sys.modules\n"
        "for info in pkgutil.walk_packages(tlflax.__path__, 'tlflax.'):\n"
        "    importlib.import_module(info.name)\n"
        "missing = [n for n in tlflax.__all__ if getattr(tlflax, n, None) is None]\n"
        "loaded = sorted(m.split('.')[0] for m in sys.modules)\n"
        "heavy = sorted({m for m in loaded if m in ('prefect', 'dvc', 'great_expectations')})\n"
        "print(json.dumps({'light': light, 'missing': missing, 'heavy': heavy,"
        " 'documented': [n for n in tlflax.__all__ if not getattr(tlflax, n).__doc__],"
        " 'shadowed': [n for n in tlflax.__all__ if not callable(getattr(tlflax, n))]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["light"], "import tlflax alone must not load JAX"
    assert facts["missing"] == []
    assert facts["heavy"] == [], "the library must not import Prefect, DVC or GX"
    assert facts["documented"] == [], "every public name has a docstring"
    # With every submodule loaded, no public name is a module of the same name.
    assert facts["shadowed"] == []


def test_an_unknown_name_is_an_attribute_error() -> None:
    import tlflax

    with pytest.raises(AttributeError, match="no attribute 'fit_everything'"):
        tlflax.fit_everything  # noqa: B018


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    if not RAW_FASHION_MNIST.exists():
        pytest.fail(f"{RAW_FASHION_MNIST} is missing: run `make assets` (scripts/fetch_assets.sh)")
    # The example's paths are relative to the project folder: the raw data, and work/.
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw").symlink_to(ROOT / "data/raw")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)  # noqa: S102
    printed = output.getvalue()
    task, report = namespace["task"], namespace["report"]
    # It really learnt: 10 classes, chance 0.1; 20 examples per class get well past it.
    assert report["accuracy"] > 0.5, report["accuracy"]
    assert f"test accuracy {report['accuracy']:.3f}" in printed
    assert "head reads" in printed  # the plan table
    # The saved classifier predicts what the fine-tuned model in memory predicts.
    probabilities = namespace["probabilities"]
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    names = [task.class_names()[i] for i in probabilities.argmax(axis=1)]
    assert str(names) in printed
    import tlflax

    in_memory = tlflax.evaluate(task, namespace["result"].model, namespace["plan"].finetune)
    assert in_memory["accuracy"] == report["accuracy"]
    model, forward = tlflax.load_classifier(task, "work/classifier")
    reloaded = tlflax.evaluate(task, model, namespace["plan"].finetune)
    assert reloaded["accuracy"] == pytest.approx(report["accuracy"], abs=1e-4)
    assert (tmp_path / "work/classifier/architecture.json").exists()


@pytest.mark.slow
def test_one_call_runs_every_step_and_its_classifier_predicts_again(tmp_path: Path) -> None:
    import tlflax
    from tests.small_project import SMALL_PARAMS

    raw = dict(SMALL_PARAMS, prepare={**SMALL_PARAMS["prepare"], "raw_dir": str(RAW_FASHION_MNIST)})
    params = tlflax.parse_params(raw)
    report = tlflax.run_transfer(params, tmp_path / "work")
    assert report["strategy"] == "rules"  # the written rules win over the advice
    assert 0.0 <= report["head_only_accuracy"] <= 1.0
    # Its outputs: the stored dataset and the classifier, and no checkpoints left behind.
    assert not (tmp_path / "work/checkpoints").exists()
    task = tlflax.open_dataset(params, tmp_path / "work/data")
    images, labels = task.read_split("test")
    probabilities = tlflax.predict(task, tmp_path / "work/classifier", images)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    assert accuracy == pytest.approx(report["accuracy"], abs=1e-4)

"""Every stage's dvc.yaml entry lists the code it runs and the params it reads."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from pipelines.stage_deps import DEFAULT_PIPELINES, ROOT, import_closure, sync

PIPELINE_FILES = [ROOT / name for name in DEFAULT_PIPELINES]


@pytest.mark.parametrize("pipeline_file", PIPELINE_FILES, ids=DEFAULT_PIPELINES)
def test_code_deps_are_the_import_closure(pipeline_file):
    assert sync(pipeline_file, write=False) == []


def test_closure_follows_imports_through_packages():
    closure = import_closure("pipelines.stages.finetune")
    # Imported directly, through another module, and the packages on the way.
    assert "pipelines/stages/finetune.py" in closure
    assert "tlflax/plan.py" in closure and "tlflax/advisor.py" in closure
    assert "tlflax/__init__.py" in closure and "tlflax/data/__init__.py" in closure
    assert "pipelines/stages/evaluate.py" not in closure


def test_a_missing_module_is_reported(tmp_path):
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = pipeline["stages"]["finetune"]["deps"]
    deps.remove("tlflax/plan.py")
    copy = tmp_path / "dvc.yaml"
    copy.write_text(yaml.safe_dump(pipeline))
    (line,) = [line for line in sync(copy, write=False) if "stage finetune" in line]
    assert "missing ['tlflax/plan.py']" in line


# --------------------------------------------------------------------------------------------
# Params: every `params.<section>.<key>` a stage's code reads is declared for that stage.
# --------------------------------------------------------------------------------------------


def _params_read(files: list[str]) -> set[str]:
    """``section.key`` (or ``section``) of every ``params.``/``self.params.`` attribute chain."""
    read = set()
    for name in files:
        tree = ast.parse((ROOT / name).read_text())
        # Only whole chains: `params.prepare.seed`, not also its inner `params.prepare`.
        inner = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue
            chain = []
            current = node
            while isinstance(current, ast.Attribute):
                chain.append(current.attr)
                current = current.value
            base = current.id if isinstance(current, ast.Name) else None
            if isinstance(current, ast.Attribute) or base not in ("params", "self"):
                continue
            chain.reverse()
            if base == "self":
                if chain[:1] != ["params"]:
                    continue
                chain = chain[1:]
            if chain and chain[0] in SECTIONS:
                read.add(".".join(chain[:2]))
    return read


SECTIONS = {
    "prepare",
    "class_balance",
    "validate_params",
    "baseline",
    "extract",
    "train_head",
    "advise",
    "finetune",
    "train_scratch",
    "evaluate",
}
# Read through properties derived from a declared key.
DERIVED = {"prepare.stored_name": "prepare.dataset", "prepare.modality": "prepare.dataset"}


def _covered(key: str, declared: list[str]) -> bool:
    key = DERIVED.get(key, key).replace("validate_params", "validate")
    return any(key == entry or key.startswith(entry + ".") for entry in declared)


@pytest.mark.parametrize("pipeline_file", PIPELINE_FILES, ids=DEFAULT_PIPELINES)
def test_params_a_stage_reads_are_declared(pipeline_file):
    pipeline = yaml.safe_load(pipeline_file.read_text())
    for name, stage in pipeline["stages"].items():
        module = re.search(r"pipelines\.stages\.(\w+)", stage["cmd"]).group(1)
        # The stage script and the stage helpers it runs (the library takes typed sections).
        # The modality task (tlflax/tasks.py) serves every stage and reads per method, which
        # this reading of source cannot tell apart: a stage that uses it declares what every
        # task reads - the modality (prepare.dataset) and the backbone's input (extract).
        closure = import_closure(f"pipelines.stages.{module}")
        files = [path for path in closure if path.startswith("pipelines/stages/")]
        declared = []
        for entry in stage.get("params", []):
            declared += next(iter(entry.values())) if isinstance(entry, dict) else [entry]
        read = _params_read(files)
        if "tlflax/tasks.py" in closure:
            read |= {"prepare.dataset", "extract"}
        undeclared = {key for key in read if not _covered(key, declared)}
        assert not undeclared, f"{pipeline_file.name}: stage {name} reads {sorted(undeclared)}"


def test_no_stage_imports_another_stage_nor_the_library_orchestration():
    """A stage script runs one step: it may use the stage helpers (common, training), never
    another stage's script; and the library never imports Prefect, DVC or the pipelines."""
    stages_dir = ROOT / "pipelines/stages"
    stage_names = {path.stem for path in stages_dir.glob("*.py") if "__main__" in path.read_text()}
    assert {"prepare", "advise", "finetune", "evaluate"} <= stage_names
    for name in sorted(stage_names):
        closure = import_closure(f"pipelines.stages.{name}")
        others = [f"pipelines/stages/{other}.py" for other in stage_names - {name}]
        assert not set(others) & set(closure), f"stage {name} imports another stage"
    for path in sorted((ROOT / "tlflax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in {"prefect", "dvc", "dvclive", "pipelines"}, (
                    f"{path.relative_to(ROOT)} imports {module}"
                )

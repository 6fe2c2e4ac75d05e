"""A stage's code dependencies, derived from its imports: one source of truth for dvc.yaml.

A stage ``<name>`` runs ``python -m pipelines.stages.<name>``; the Python files it can
execute are the import closure of that module within this project (``tlflax``,
``pipelines``), the ``__init__`` of every package on the way included. Its ``dvc.yaml``
entry must list each of them (or a folder holding them), else an edit of that file would
not re-run the stage. ``python -m pipelines.stage_deps`` rewrites the code entries of every
stage's ``deps`` in the given ``dvc.yaml`` files from the closure (data entries, comments and
order of the rest kept); ``--check`` only reports what differs (the tests run it).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tlflax", "pipelines")
# The project's pipeline and every experiment's (python -m pipelines.new_experiment).
DEFAULT_PIPELINES = (
    "dvc.yaml",
    *sorted(
        path.relative_to(ROOT).as_posix() for path in (ROOT / "experiments").glob("*/dvc.yaml")
    ),
)
# Folders listed whole when the closure holds every Python file in them (shorter lists).
WHOLE_FOLDERS = ("tlflax/models",)


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None  # a name imported from a module, not a module


def _imported_modules(path: Path, package: str) -> set[str]:
    """Project modules ``path`` imports (``from a import b`` may name module ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, module] if module else parts)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in PACKAGES}


def import_closure(module: str) -> list[str]:
    """Repository-relative paths of every project file ``module`` can execute, sorted."""
    files: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = _module_file(name)
        if path is None or name in files:
            continue
        files[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        parts = name.split(".")
        pending.extend(".".join(parts[:end]) for end in range(1, len(parts)))
        pending.extend(_imported_modules(path, package))
    return sorted({path.relative_to(ROOT).as_posix() for path in files.values()})


def code_dependencies(stage: str) -> list[str]:
    """What ``dvc.yaml`` should list as the code ``stage`` depends on."""
    closure = import_closure(f"pipelines.stages.{stage}")
    listed = []
    for folder in WHOLE_FOLDERS:
        members = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
        if members <= set(closure):
            listed.append(folder)
            closure = [path for path in closure if path not in members]
    return sorted(closure + listed)


def is_code(entry: str) -> bool:
    return entry.split("/")[0] in PACKAGES


def _stages(pipeline: dict) -> Iterable[tuple[str, dict]]:
    for name, stage in pipeline.get("stages", {}).items():
        if "pipelines.stages." in str(stage.get("cmd", "")):
            yield name, stage


def pipeline_yaml():
    """The reader and writer of the project's YAML files that keeps their comments and
    layout (ruamel.yaml, DVC's own YAML library), with the layout of the dvc.yaml files."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 100
    return yaml


def sync(pipeline_file: Path, *, write: bool) -> list[str]:
    """Code deps of every stage in ``pipeline_file`` made equal to their closure.

    Returns:
      One line per stage whose listed code deps differ (what is missing / extra).
    """
    yaml = pipeline_yaml()
    pipeline = yaml.load(pipeline_file.read_text(encoding="utf-8"))
    differences = []
    for name, stage in _stages(pipeline):
        deps = stage.setdefault("deps", [])
        listed = [entry for entry in deps if isinstance(entry, str) and is_code(entry)]
        wanted = code_dependencies(stage["cmd"].split("pipelines.stages.")[1].split()[0])
        missing = sorted(set(wanted) - set(listed))
        extra = sorted(set(listed) - set(wanted))
        if not (missing or extra):
            continue
        differences.append(f"{pipeline_file}: stage {name}: missing {missing}, extra {extra}")
        data = [entry for entry in deps if not (isinstance(entry, str) and is_code(entry))]
        deps.clear()
        deps.extend([*data, *wanted])
    if write and differences:
        with open(pipeline_file, "w", encoding="utf-8") as handle:
            yaml.dump(pipeline, handle)
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stage_deps", description=__doc__)
    parser.add_argument("pipeline_files", nargs="*", default=list(DEFAULT_PIPELINES))
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    arguments = parser.parse_args()
    differences = []
    for pipeline_file in arguments.pipeline_files:
        differences += sync(ROOT / pipeline_file, write=not arguments.check)
    for line in differences:
        print(line)
    if arguments.check and differences:
        sys.exit(1)


if __name__ == "__main__":
    main()

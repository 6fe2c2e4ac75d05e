"""What every stage script shares: its command line, the output layout, and error handling.

A stage is ``python -m pipelines.stages.<name> [--params params.yaml]``. It is the only place
that knows file paths; the library gets typed config sections and paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlflax.config import Params, ParamsError, load_params

# Errors that mean "the input is wrong", not "the code is wrong": they are reported as one
# line naming the file or key, with a non-zero exit and no traceback (TLFLAX_DEBUG=1 shows it).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ParamsError, FileNotFoundError, ValueError)
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class ExperimentPaths:
    """Where one experiment's outputs live (the same layout dvc.yaml declares)."""

    experiment: str

    @property
    def dataset_dir(self) -> Path:
        return Path("data") / self.experiment / "tfds"

    @property
    def manifest(self) -> Path:
        return Path("data") / self.experiment / "manifest.parquet"

    @property
    def data_docs(self) -> Path:
        return Path("reports") / self.experiment / "data_docs"

    @property
    def features(self) -> Path:
        return Path("data") / self.experiment / "features"

    @property
    def head(self) -> Path:
        return Path("models") / self.experiment / "head"

    @property
    def finetune(self) -> Path:
        return Path("models") / self.experiment / "finetune"

    @property
    def scratch(self) -> Path:
        return Path("models") / self.experiment / "scratch"

    @property
    def plots(self) -> Path:
        return Path("plots") / self.experiment

    def metrics(self, stage: str) -> Path:
        return Path("metrics") / self.experiment / f"{stage}.json"

    def live(self, stage: str) -> Path:
        return Path("dvclive") / self.experiment / stage


COMPILATION_CACHE = Path(".cache/jax")


def enable_compilation_cache() -> None:
    """Keep XLA compilations on disk: a re-run stage skips tens of seconds of compiling."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE.absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def params_parser(program: str, description: str | None = None) -> argparse.ArgumentParser:
    """A command line with the ``--params`` option every stage (and ``predict``) takes."""
    parser = argparse.ArgumentParser(prog=program, description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file")
    return parser


def run_command(
    name: str, params_file: str, body: Callable[[Params, ExperimentPaths], None]
) -> None:
    """Validate ``params_file``, run ``body``; bad input exits 2 with one line, no traceback."""
    # Quiet third-party telemetry before anything imports it.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    enable_compilation_cache()
    try:
        params = load_params(params_file)
        body(params, ExperimentPaths(params.experiment))
    except EXPECTED_ERRORS as error:
        if os.environ.get("TLFLAX_DEBUG"):
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run_stage(name: str, body: Callable[[Params, ExperimentPaths], None]) -> None:
    """Parse ``--params``, validate them, run ``body``; bad input exits 2 with one line."""
    arguments = params_parser(f"python -m pipelines.stages.{name}").parse_args()
    run_command(name, arguments.params, body)

"""What every stage script shares: its command line, the output layout, and error handling.

A stage is ``python -m pipelines.stages.<name> [--params params.yaml]``. It is the only place
that knows file paths; the library gets typed config sections and paths.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlflax.config import Params, ParamsError, load_params
from tlflax.errors import InputError, MissingInputError
from tlflax.io import atomic_path

# Errors that mean "the input is wrong", not "the code is wrong": raised where the code
# recognised the bad input (tlflax.errors), they are reported as one line naming the file or
# key, with exit status 2 and no traceback (TLFLAX_DEBUG=1 shows it). Any other exception,
# a ValueError or FileNotFoundError included, is a bug: it escapes with its traceback and
# Python's exit status 1 - as does a failed data validation (the validate stage's verdict).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (InputError,)
EXIT_BAD_INPUT = 2
# Training diverged (a NaN/Inf loss, tlflax.loop.NonFiniteLossError, a FloatingPointError):
# the message names the epoch and step; the checkpoints written before it are kept.
EXIT_DIVERGED = 3


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
    def baseline(self) -> Path:
        """The classical baseline's choice (model.json) and probabilities (predictions.npz)."""
        return Path("models") / self.experiment / "baseline"

    @property
    def plots(self) -> Path:
        return Path("plots") / self.experiment

    def model_dir(self, stage: str) -> Path:
        """The model folder a training stage writes."""
        by_stage = {
            "train_head": self.head,
            "finetune": self.finetune,
            "train_scratch": self.scratch,
        }
        return by_stage[stage]

    def metrics(self, stage: str) -> Path:
        return Path("metrics") / self.experiment / f"{stage}.json"

    def live(self, stage: str) -> Path:
        return Path("dvclive") / self.experiment / stage


COMPILATION_CACHE = Path(".cache/jax")
# Checkpoints of a training run in progress, kept outside the stage's DVC outputs: DVC
# deletes those before it runs a stage again, which would make a killed run start over.
RESUME_CHECKPOINTS = Path(".cache/resume")


def resume_dir(output_dir: Path) -> Path:
    """Where the training run that writes ``output_dir`` keeps its checkpoints meanwhile."""
    return RESUME_CHECKPOINTS / output_dir


def write_live_log(live_dir: Path, epochs: list[dict[str, float]]) -> None:
    """Write per-epoch metrics as a dvclive log in ``live_dir``, atomically.

    The training stages call it as epochs end (:class:`LiveLog`) with the run's whole
    history so far (which a resumed run restores from its checkpoint): `dvc plots` shows
    progress while training runs, the log of a run that was killed and resumed holds every
    epoch, and a kill never leaves a half-written log for DVC to record.
    """
    from dvclive import Live

    with (
        atomic_path(live_dir, directory=True) as temporary,
        Live(str(temporary), save_dvc_exp=False, dvcyaml=None) as live,
    ):
        for metrics in epochs:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()


class LiveLog:
    """A training stage's dvclive log kept up to date while it trains: rewritten whole from
    the epochs so far (:func:`write_live_log`) when ``interval_seconds`` have passed since the
    last write, and at the end (``final``). Bounded: a head's epochs take milliseconds and a
    rewrite of 100 epochs about 0.2 s, so rewriting after every one would cost more than
    the training."""

    def __init__(self, live_dir: Path, interval_seconds: float = 5.0):
        self.live_dir = live_dir
        self.interval_seconds = interval_seconds
        self.written_at = -math.inf

    def update(self, epochs: list[dict[str, float]], *, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.written_at >= self.interval_seconds:
            write_live_log(self.live_dir, epochs)
            self.written_at = now


def check_batch_fits(key: str, batch_size: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse a batch size whose input arrays alone would exceed this machine's memory.

    Checked before anything is allocated: a batch is padded to its full size, so a huge
    ``batch_size`` would otherwise fail deep inside numpy or XLA, or be killed by the OOM
    killer without a word.

    Raises:
      ParamsError: naming ``key``.
    """
    # Per example: every input row, plus the mask (float32) and gather index (int64).
    per_example = sum(
        array.dtype.itemsize * int(np.prod(array.shape[1:])) for array in arrays.values()
    )
    needed = batch_size * (per_example + 12)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ParamsError(
            f"'{key}': a batch of {batch_size} examples needs {needed / 2**30:,.1f} GiB for its "
            f"inputs alone, more than this machine's {memory / 2**30:,.1f} GiB of memory; "
            "lower it"
        )


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


def advised_backbone(paths: ExperimentPaths) -> str:
    """The backbone the advise stage chose (``extract.backbone: auto``), from advice.json.

    Read as JSON here, not through tlflax.advice_rules: every stage imports this module, and
    the advisor's modules would become dependencies of stages that never advise.

    Raises:
      MissingInputError: no advice yet, or advice made for a written backbone.
    """
    path = paths.metrics("advice")
    if not path.exists():
        raise MissingInputError(
            f"{path} is missing: extract.backbone is auto and the advise stage picks it; "
            "run the advise stage first (dvc repro advise)"
        )
    choice = json.loads(path.read_text(encoding="utf-8")).get("backbone")
    if not isinstance(choice, dict) or not isinstance(choice.get("chosen"), str):
        raise MissingInputError(
            f"{path} holds no choice of backbone but extract.backbone is auto: run the "
            "advise stage again with these params (dvc repro advise)"
        )
    return choice["chosen"]


# The commands that run before the advise stage has chosen a backbone (extract.backbone:
# auto); every other one gets the params with the chosen backbone written in.
STAGES_BEFORE_ADVICE = frozenset({"prepare", "validate", "baseline", "advise"})


def run_command(
    name: str, params_file: str, body: Callable[[Params, ExperimentPaths], None]
) -> None:
    """Validate ``params_file``, run ``body``; bad input exits 2 with one line, no traceback.

    Bad input is an :class:`~tlflax.errors.InputError` (or memory the batch size asks for
    and the machine lacks); a diverged training exits 3, also with one line. Anything else
    is a bug and keeps its traceback (exit status 1).
    """
    # Quiet third-party telemetry before anything imports it.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    enable_compilation_cache()
    _ignore_callbacks_into_closed_event_loops()
    params = None
    try:
        params = load_params(params_file)
        paths = ExperimentPaths(params.experiment)
        if name not in STAGES_BEFORE_ADVICE:
            # Only the stages after advise see extract.backbone (through advice.json).
            params = params.with_chosen_backbone(lambda: advised_backbone(paths))
        body(params, paths)
    except Exception as error:
        failure = _expected_failure(name, params, error)
        if failure is None or os.environ.get("TLFLAX_DEBUG"):
            raise
        status, message = failure
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(status)


def _ignore_callbacks_into_closed_event_loops() -> None:
    """Keep the debris of a failed Orbax restore from printing tracebacks under its error.

    When a restore fails (a damaged checkpoint, one of another shape), Orbax closes its
    event loop while TensorStore reads are still in flight: their completion callbacks then
    raise ``RuntimeError('Event loop is closed')``, and Orbax's abandoned read coroutines
    are finalised holding their own errors. Python reports both as unraisable exceptions,
    each with a full traceback, after the one-line error that already said what failed.
    Every other unraisable exception is still shown.
    """
    default_hook = sys.unraisablehook
    if getattr(default_hook, "ignores_closed_event_loops", False):
        return  # installed by an earlier stage run in this process

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        value, source = unraisable.exc_value, unraisable.object
        late_callback = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        abandoned_read = inspect.iscoroutine(source) and "orbax" in source.cr_code.co_filename
        if late_callback or abandoned_read:
            return
        default_hook(unraisable)

    hook.ignores_closed_event_loops = True
    sys.unraisablehook = hook


def _expected_failure(name: str, params: Params | None, error: Exception) -> tuple[int, str] | None:
    """(exit status, one-line message) for a failure that is not a bug, else None."""
    import jax

    # Library messages may name the phase, which is the stage's own name here.
    message = str(error).removeprefix(f"{name}: ")
    if isinstance(error, EXPECTED_ERRORS):
        return EXIT_BAD_INPUT, message
    if isinstance(error, FloatingPointError):
        return EXIT_DIVERGED, message
    # XLA reports an allocation it cannot make as RESOURCE_EXHAUSTED (on a GPU, mostly); any
    # other runtime error is a bug and keeps its traceback.
    if isinstance(error, MemoryError) or (
        isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)
    ):
        batch_size = getattr(getattr(params, name, None), "batch_size", None)
        advice = f"; lower '{name}.batch_size' (now {batch_size})" if batch_size else ""
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return EXIT_BAD_INPUT, f"out of memory ({detail}){advice}"
    return None


def run_stage(name: str, body: Callable[[Params, ExperimentPaths], None]) -> None:
    """Parse ``--params``, validate them, run ``body``; bad input exits 2 with one line."""
    arguments = params_parser(f"python -m pipelines.stages.{name}").parse_args()
    run_command(name, arguments.params, body)

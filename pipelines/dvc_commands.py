"""DVC from Python: a repository in this process, or a command in a child process.

Also which failed commands are transient (worth another attempt) and how often they are
retried, shared by the Prefect flow (:mod:`pipelines.flows`) and the seed and ablation runs.
:mod:`pipelines.flows` re-exports these names after setting the offline environment (no
telemetry lookups), which has to come before DVC's first import.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dvc.repo import Repo

# A DVC remote (a directory, or s3://, gs://, ... with the matching dvc extra) that overrides
# the project's default remote, so a worker can use the team's storage without editing config.
REMOTE_ENVIRONMENT_VARIABLE = "TLFLAX_DVC_REMOTE"
ENVIRONMENT_REMOTE_NAME = "tlflax-environment"

# What "transient" means here, concretely; only these failures are retried:
# - DVC's repository lock still held after DVC's own 3-second wait ("Unable to acquire lock"):
#   another DVC process in the same checkout (a teammate's `dvc status`, an IDE extension,
#   another flow) will let go of it.
# - The stage, or DVC itself, killed by SIGKILL or SIGTERM: the OOM killer, a preempted node,
#   a container stopped under it; the next attempt may get the memory or the machine back.
# A stage that exits with its own status is never retried: 2 is bad params or input, 3 a
# diverged training, 1 a failed data validation or a bug (its traceback is in the log); the
# same inputs would fail the same way.
LOCK_CONTENTION_MESSAGE = "Unable to acquire lock"
TRANSIENT_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM})
STAGE_EXIT_STATUS = re.compile(r"exited with (-?\d+)")
SHELL_SIGNAL_OFFSET = 128  # a shell reports a child killed by signal N as status 128 + N
RETRIES = 3
# The first retry comes soon (lock holders are mostly short `dvc status` calls); the later
# ones outwait a long `dvc repro` in the same checkout or a node being replaced.
RETRY_DELAYS_SECONDS = [5, 30, 120]
OUTPUT_TAIL_LINES = 200


@contextlib.contextmanager
def open_repository(project_dir: str, **repo_options: Any) -> Iterator[Repo]:
    """A DVC ``Repo`` for ``project_dir``, with the working directory set to it.

    DVC's Python API resolves stage targets against the current directory, not the repo root.
    """
    with contextlib.chdir(project_dir), Repo(project_dir, **repo_options) as repository:
        yield repository


def remote_options(remote: str | None) -> dict[str, Any]:
    """``Repo`` options choosing the DVC remote: ``remote`` by name, else $TLFLAX_DVC_REMOTE,
    else the project's default remote (``dvc remote default``)."""
    if remote:
        return {"remote": remote}
    url = os.environ.get(REMOTE_ENVIRONMENT_VARIABLE)
    if not url:
        return {}
    if "://" not in url:
        # DVC reads a relative remote path against the config file; this one has none.
        url = str(Path(url).expanduser().resolve())
    return {"remote": ENVIRONMENT_REMOTE_NAME, "remote_config": {"url": url}}


def is_transient_failure(return_code: int, error_lines: list[str]) -> bool:
    """Whether a failed DVC command is worth another attempt (see ``TRANSIENT_SIGNALS``).

    Args:
        return_code: the DVC process's status as ``subprocess`` reports it (negative: signal).
        error_lines: DVC's ``ERROR:`` lines; a stage's status is in "exited with N".
    """
    if return_code < 0:
        return -return_code in TRANSIENT_SIGNALS
    for line in error_lines:
        if LOCK_CONTENTION_MESSAGE in line:
            return True
        match = STAGE_EXIT_STATUS.search(line)
        if match:
            status = int(match.group(1))
            killed_by = -status if status < 0 else status - SHELL_SIGNAL_OFFSET
            return killed_by in TRANSIENT_SIGNALS
    return False


def _stage_environment() -> dict[str, str]:
    # Stage commands call `python`; make it this interpreter (the project's virtualenv).
    environment = dict(os.environ)
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment["PATH"]
    return environment


def stream_dvc(
    arguments: list[str], project_dir: str, echo: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run ``dvc <arguments>`` in ``project_dir``, passing each output line to ``echo``.

    Returns:
        DVC's exit status (negative: killed by that signal) and its last output lines.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *arguments],
        cwd=project_dir,
        env=_stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    # DVC prints its errors last; keeping a tail bounds memory on long, chatty stages.
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    for line in process.stdout:
        line = line.rstrip()
        if line:
            echo(line)
            tail.append(line)
    return process.wait(), list(tail)

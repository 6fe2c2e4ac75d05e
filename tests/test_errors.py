"""Which failures a command reports as bad input (exit 2, one line) and which as bugs.

Bad input is an ``InputError`` (tlflax/errors.py): raised where the code recognised it and
can name what to change. Anything else - a plain ``ValueError`` or ``FileNotFoundError``
included - is a bug and must keep its traceback, with Python's exit status 1.
End to end, through real stage runs: tests/test_bad_inputs.py.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.stages.common import EXIT_BAD_INPUT, ExperimentPaths, run_command
from tests.conftest import ROOT, run
from tlflax.checkpoint import CheckpointError
from tlflax.config import Params, ParamsError
from tlflax.data.catalog import CatalogNotPreparedError
from tlflax.data.errors import DataError
from tlflax.data.fine_foods import FineFoodsDataError
from tlflax.errors import InputError, MissingInputError
from tlflax.models.torch_weights import WeightsFileError
from tlflax.transfer import UncoveredParametersError

PARAMS_FILE = str(ROOT / "params.yaml")


@pytest.mark.parametrize(
    "error_class",
    [
        ParamsError,
        DataError,
        CatalogNotPreparedError,
        WeightsFileError,
        CheckpointError,
        FineFoodsDataError,
        UncoveredParametersError,
        MissingInputError,
    ],
)
def test_every_kind_of_bad_input_is_an_input_error(error_class: type[Exception]) -> None:
    assert issubclass(error_class, InputError)
    # Callers that caught ValueError before InputError existed still catch it.
    assert issubclass(error_class, ValueError)


def test_a_missing_input_is_also_a_file_not_found_error() -> None:
    error = MissingInputError("data/vision/manifest.parquet: not found (run prepare first)")
    assert isinstance(error, FileNotFoundError)
    assert str(error) == "data/vision/manifest.parquet: not found (run prepare first)"


def _raising(error: Exception) -> Callable[[Params, ExperimentPaths], None]:
    def body(params: Params, paths: ExperimentPaths) -> None:
        raise error

    return body


@pytest.mark.parametrize(
    "error",
    [
        DataError("data/vision/features/train.npz", "file is empty (0 bytes)"),
        MissingInputError("models/vision/head: not found (run the train_head stage first)"),
        ParamsError("'train_head.batch_size': more than this machine's memory; lower it"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_bad_input_exits_2_with_one_line_naming_it(
    error: InputError, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TLFLAX_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_command("demo", PARAMS_FILE, _raising(error))
    assert stop.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [f"demo: error: {error}"]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("could not convert string to float: 'oops'"),
        FileNotFoundError(2, "No such file or directory", "some/internal/file"),
        KeyError("label"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_any_other_exception_escapes_as_a_bug(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a SystemExit: the exception itself reaches Python, which prints its traceback.
    monkeypatch.delenv("TLFLAX_DEBUG", raising=False)
    with pytest.raises(type(error)) as raised:
        run_command("demo", PARAMS_FILE, _raising(error))
    assert raised.value is error


def test_a_bug_in_a_command_exits_1_with_its_traceback(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pipelines.stages.common import run_command

        def body(params, paths):
            float("not a number")  # a ValueError nobody recognised as bad input

        run_command("demo", {PARAMS_FILE!r}, body)
        """
    )
    result = run([sys.executable, "-c", script], cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert "ValueError: could not convert string to float: 'not a number'" in result.stderr
    assert "demo: error:" not in result.stderr

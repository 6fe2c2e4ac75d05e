"""Atomic outputs: a reader sees either the old file or the complete new one, never a half.

Every output is written beside its target under a temporary name, then renamed into place
(``os.replace`` is atomic on one filesystem), so a killed stage never leaves a half-written
file for DVC - or the next stage - to pick up. The temporary name carries the writer's
process id: what a process killed outright (SIGKILL, the OOM killer) leaves behind is
removed by the next writer of the same target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlflax.data.errors import DataError
from tlflax.errors import MissingInputError

if TYPE_CHECKING:
    import pandas as pd

# Every member of an .npz gets this timestamp (the earliest a zip file can hold), so equal
# arrays give equal bytes: DVC then sees a re-run that changed nothing as unchanged.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_MAGIC = b"PK\x03\x04"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_leftovers(target: Path) -> None:
    """Remove temporary siblings of ``target`` whose writing process no longer runs."""
    for marker in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{marker}-*"):
            pid = leftover.name.removeprefix(f".{target.name}.{marker}-").split("-")[0]
            if pid.isdigit() and not _process_is_running(int(pid)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success it replaces ``target``.

    On an exception the temporary path is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    # mkstemp and mkdtemp are private to their owner (0600, 0700); outputs get the usual
    # permissions of a new file or folder.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, (0o777 if directory else 0o666) & ~umask)
    try:
        yield temporary
        if directory and target.exists():
            # A directory cannot be replaced in one rename: move the old one aside first so
            # that the window without a complete target is a single rename long.
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def write_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays to an ``.npz`` file, atomically; equal arrays give equal bytes.

    The file is what ``np.savez`` writes, but without the time of writing in it.
    """
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def read_arrays(path: str | Path, required: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file written by :func:`write_arrays`.

    Args:
      path: the ``.npz`` file.
      required: names the file must hold.

    Raises:
      MissingInputError: naming ``path`` when it does not exist.
      DataError: naming ``path`` when it is empty, not an ``.npz`` archive, holds pickled
        (object) arrays, or lacks a ``required`` array.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: not found (run the stage that writes it first)")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)", "run the stage that writes it again")
    with open(path, "rb") as handle:
        # np.load takes anything else for a pickle, and reports it as one it refused.
        if handle.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise DataError(path, "not an .npz archive (no zip header)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise DataError(path, f"not a readable .npz archive ({error})") from None
        raise DataError(
            path, "holds pickled (object) arrays, which are refused: loading them could run code"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(path, f"not a readable .npz archive ({error})") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DataError(path, f"has no array {missing[0]!r}; arrays present: {sorted(arrays)}")
    return arrays


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read a Parquet table (a manifest); errors name ``path``.

    Raises:
      MissingInputError: naming ``path`` when it does not exist.
      DataError: naming ``path`` when it is empty or not a readable Parquet file.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: not found (run the stage that writes it first)")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)", "run the stage that writes it again")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:
        # pyarrow's ArrowInvalid is a ValueError; its message never names the file.
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(path, f"not a readable Parquet file ({detail})") from None

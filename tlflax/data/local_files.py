"""Safe listing of a user's dataset folder: entries that stay inside it, and its splits.

A dataset source is untrusted input. Whatever its files are (symlinks, relative links
through ``..``), reading it must never touch anything outside its root folder, so every
path a reader opens goes through :func:`resolve_inside` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tlflax.data.errors import DataError

REQUIRED_SPLITS: tuple[str, ...] = ("train", "test")
OPTIONAL_SPLITS: tuple[str, ...] = ("validation",)


def resolve_inside(path: Path, root: Path) -> Path:
    """``path`` with every symlink and ``..`` resolved, provided it stays inside ``root``.

    Open the returned path, not ``path``: it is the one that was checked.

    Raises:
        DataError: naming ``path`` when it does not exist (a dangling link included) or
            resolves outside ``root``.
    """
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise DataError(path, f"cannot be resolved ({error})") from None
    resolved_root = root.resolve(strict=True)
    if not resolved.is_relative_to(resolved_root):
        raise DataError(
            path,
            f"resolves to {resolved}, outside the dataset root {resolved_root}",
            "a dataset source may only read files under its root; copy the file in instead "
            "of linking to it",
        )
    return resolved


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted by name, without hidden ones (``.DS_Store``, ``.git``)."""
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def find_splits(root: Path, suffixes: Sequence[str] = ("",)) -> dict[str, Path]:
    """The split entries of ``root``: ``<split><suffix>`` per split, resolved inside ``root``.

    ``train`` and ``test`` are required, ``validation`` is optional. An entry that names no
    split (a ``val/`` folder, a ``dev.csv``) is refused rather than skipped: a split left
    out unnoticed would change what the model is validated on.

    Args:
        root: the folder holding the splits.
        suffixes: accepted name endings: ``("",)`` for split folders, ``(".csv", ".jsonl")``
            for split files.

    Returns:
        split name -> resolved path, in the order train, test, validation.

    Raises:
        DataError: naming ``root`` when it is missing or a required split is absent, or
            naming the entry that is ambiguous, unknown or outside ``root``.
    """
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    splits = (*REQUIRED_SPLITS, *OPTIONAL_SPLITS)
    split_of_name = {f"{split}{suffix}": split for split in splits for suffix in suffixes}
    entries: dict[str, Path] = {}
    for entry in visible_entries(root):
        split = split_of_name.get(entry.name)
        if split is None:
            raise DataError(entry, "is not a split", f"expected {list(split_of_name)}")
        if split in entries:
            raise DataError(entry, f"split {split!r} is also given as {entries[split].name}")
        entries[split] = entry
    missing = [split for split in REQUIRED_SPLITS if split not in entries]
    if missing:
        raise DataError(
            root,
            f"required split {missing[0]!r} is missing",
            f"expected one of {[f'{missing[0]}{suffix}' for suffix in suffixes]}",
        )
    return {split: resolve_inside(entries[split], root) for split in splits if split in entries}

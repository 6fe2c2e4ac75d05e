"""The one exception type for bad or missing data.

Every message starts with *where* the problem is (a file, a record, a key), so a
failing pipeline stage points straight at the thing to fix.
"""

from __future__ import annotations

from pathlib import Path

from tlflax.errors import InputError


class DataError(InputError):
    """Raised when data is missing, malformed or inconsistent.

    Args:
        location: the file, record (e.g. ``"train[17]"``) or key the problem is in.
        problem: what is wrong, in a sentence.
        hint: optional advice on how to fix it.

    Example:
        >>> str(DataError(Path("labels.gz"), "file is truncated", "run `make assets`"))
        'labels.gz: file is truncated (run `make assets`)'
    """

    def __init__(self, location: str | Path, problem: str, hint: str | None = None) -> None:
        self.location = str(location)
        self.problem = problem
        self.hint = hint
        message = f"{self.location}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, str | None]]:
        # Exceptions pickle as ``cls(*args)`` by default, which would lose the fields;
        # orchestrators (Prefect) pickle exceptions raised in tasks.
        return type(self), (self.location, self.problem, self.hint)

"""The base classes of bad input: what a command reports in one line instead of a traceback.

An :class:`InputError` is raised where the code recognised bad input and can name the file,
record or key, and what to change: a params key out of range, a corrupt data or weights
file, a checkpoint written for another model, a file a stage needs that an earlier stage
has not written yet. A stage command (``pipelines.stages.common.run_command``) reports it
as one line and exit status 2.

Everything else that goes wrong is a bug, even when Python calls it a ``ValueError``: a
function given arguments its callers should never pass, a library's own failure, a file
the code does not validate. A command lets those escape with their traceback (exit status
1), since only the traceback says where to look.

The more specific classes live beside the code that raises them and derive from these:
``tlflax.config.ParamsError``, ``tlflax.data.errors.DataError``,
``tlflax.models.torch_weights.WeightsFileError``, ``tlflax.checkpoint.CheckpointError``,
``tlflax.data.fine_foods.FineFoodsDataError`` and
``tlflax.transfer.UncoveredParametersError``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Raised where the code recognised bad input and can name the file, record or key,
    and what to change.

    A ``ValueError``, so callers that caught ``ValueError`` before this class existed
    still catch it. The message is one line and names what is at fault.

    Example:
        >>> error = InputError("params.yaml: 'train_head.batch_size': must be at least 1")
        >>> isinstance(error, ValueError)
        True
    """


class MissingInputError(InputError, FileNotFoundError):
    """A file the code needs does not exist; the message names it and how to get it.

    Mostly the output of an earlier stage ("run stage X first"), or a file a package
    should have installed. Also a ``FileNotFoundError``, so ``except FileNotFoundError``
    still catches it.
    """

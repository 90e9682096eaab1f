"""What counts as the user's problem (one clear line, exit 2) rather than a bug (a traceback).

`UserError` is the base for the problems train finds itself. Errors defined in `infer`
(which cannot import train) and in the recipe schema are named in `is_user_error`, so
the command line's single handler treats them alike.
"""

from __future__ import annotations

import errno

from infer.errors import UserError  # one base for both packages' user errors


class RunLockedError(UserError):
    """Another live process is writing the same run directory."""


class TrainingDiverged(UserError):
    """The loss, the gradients or the weights stopped being finite numbers."""


class DiskFullError(UserError):
    """A write failed because the file system is full."""

    def __init__(self, path) -> None:
        super().__init__(f"disk full at {path}: free some space, then continue with --resume "
                         "(checkpoints written before this one are intact)")
        self.path = path


class TrainingInterrupted(UserError):
    """Ctrl-C (or a notebook's interrupt) stopped training after saving a checkpoint (Python API)."""


class MultiProcessLaunchError(UserError):
    """Started by torchrun / accelerate launch, which tunewright does not distribute over."""


# Defined where they are raised; named here so that telling them apart imports nothing heavy.
_FOREIGN_USER_ERRORS = {
    "train.recipe.RecipeError",
    "train.rundir.RunDirError",
    "infer.records.RecordsError",
    "infer.models.ModelSourceError",
    "infer.loading.LoadError",
    "train.chat_templates.ChatTemplateError",
}


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc`'s message is meant for the user (exit 2, no traceback)."""
    return any(isinstance(exc, UserError) or f"{c.__module__}.{c.__qualname__}" in _FOREIGN_USER_ERRORS
               for c in type(exc).__mro__)


def describe_train_error(exc: BaseException) -> str | None:
    """The one-line message for a user's mistake (or a full disk), None for a bug."""
    if is_user_error(exc):
        return str(exc)
    if is_disk_full(exc):
        return f"disk full at {getattr(exc, 'filename', None) or 'the output directory'}"
    return None


def is_disk_full(exc: BaseException, path=None) -> bool:
    """True for ENOSPC / EDQUOT anywhere in the exception's chain, or for a failed write (OSError,
    RuntimeError) while the file system holding `path` is full: torch.save reports a full disk
    as "PytorchStreamWriter failed writing file", without the errno."""
    seen = set()
    chain = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    if path is not None and isinstance(exc, (OSError, RuntimeError)):
        import shutil

        try:
            return shutil.disk_usage(path).free < 16 * 2**20
        except OSError:
            return False
    return False

"""How a command ends when something goes wrong, shared by `python -m infer` and `python -m train`.

A user's mistake (a missing file, a bad option value, a model that does not load) is one
line on stderr and exit 2; Ctrl-C is exit 130; both without a traceback. Anything else is a
bug and keeps its traceback. Each entrypoint says which exceptions are its users' mistakes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by Ctrl-C"


class UserError(Exception):
    """Something the user can fix: the message says what, where, and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def run_guarded(job: Callable[[], int], describe: Callable[[BaseException], str | None]) -> int:
    """Run `job()` (it returns an exit status); `describe(exc)` gives the one-line message for
    a user's mistake, or None for a bug (re-raised, traceback and all)."""
    try:
        return job()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = describe(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


@contextlib.contextmanager
def terminate_as_interrupt(grace_s: float = 30.0):
    """SIGTERM (a job scheduler, `kill`, `timeout`) unwinds like Ctrl-C while inside: `finally`
    blocks and context managers run, so temporary files are removed.

    The KeyboardInterrupt can land where Python cannot raise it: in a weakref callback or a
    `__del__` (the import system's module-lock callbacks among them), where it is printed as
    "Exception ignored" and the program goes on. Such a lost interrupt is raised again in the
    main thread a moment later (`sys.unraisablehook` sees it go). Code that catches it and goes
    on is not overruled, but the first SIGTERM also gives the unwinding `grace_s` seconds, after
    which the process exits with 143 (128 + SIGTERM) wherever it is; a second SIGTERM ends it at
    once."""
    import _thread

    state = {"deadline": None, "inside": True}

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if state["deadline"] is None:
            state["deadline"] = threading.Timer(grace_s, os._exit, args=(128 + signal.SIGTERM,))
            state["deadline"].daemon = True
            state["deadline"].start()
        raise KeyboardInterrupt

    def unraisable(info):
        hook(info)
        if state["inside"] and state["deadline"] is not None and info.exc_type is KeyboardInterrupt:
            # Raised from a thread a moment later: raised from here it would be discarded again.
            signal.signal(signal.SIGTERM, interrupt)
            again = threading.Timer(0.05, lambda: state["inside"] and _thread.interrupt_main(signal.SIGTERM))
            again.daemon = True
            again.start()

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: SIGTERM stays as it is
        previous = None
    hook = sys.unraisablehook
    if previous is not None:
        sys.unraisablehook = unraisable
    try:
        yield
    finally:
        state["inside"] = False
        if previous is not None:
            sys.unraisablehook = hook
            signal.signal(signal.SIGTERM, previous)


# Raised by safetensors / torch for files that are not what their name says; named as text so
# that telling them apart imports nothing.
_BROKEN_FILE_ERRORS = {"SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization"}
_FILE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.EEXIST,
                errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def describe_infer_error(exc: BaseException) -> str | None:
    """The message for a mistake `python -m infer` users make, or None for a bug."""
    import re

    # LoadError and RecordsError are ValueErrors; infer raises ValueError for bad option values.
    if isinstance(exc, (UserError, ValueError)) or type(exc).__name__ == "ModelSourceError":
        return str(exc)
    if isinstance(exc, re.error):
        return f"invalid regular expression: {exc}"
    if isinstance(exc, OSError) and exc.errno in _FILE_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    if type(exc).__name__ in _BROKEN_FILE_ERRORS:
        return f"a weights file is damaged or not a safetensors file ({exc})"
    return None

"""How the ``traincraft`` command ends: a user error is one line and exit status 2; a diverged or unhealthy run
exit status 1 with its message; anything else is a bug and keeps its traceback (exit status 1)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException

from traincraft.checkpoint import CheckpointError

_DEBUG_FLAG = "--debug"
_DEBUG_ENV = "TRAINCRAFT_DEBUG"


class _UserError(ValueError):
    """A configuration the CLI refuses: ``main`` prints its message alone (exit status 2)."""


def _raised_in(error: BaseException, packages: tuple[str, ...]) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and any(f"{os.sep}{package}{os.sep}" in frames[-1].filename for package in packages)


def _raised_in_callback(error: BaseException) -> bool:
    """Whether a traincraft callback raised ``error`` (or one it was raised from)."""
    while error is not None:
        folder = f"{os.sep}traincraft{os.sep}callbacks{os.sep}"
        if any(folder in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
            return True
        error = error.__cause__
    return False


def _user_message(error: BaseException) -> Optional[str]:
    """The message for an error the user can fix, or None for an internal error."""
    import argparse

    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for link in chain:
        if isinstance(link, _UserError):
            return str(link)
        if isinstance(link, argparse.ArgumentError):
            return f"{link}\nSee `traincraft <subcommand> --help` for the accepted options."
    cause = chain[-1]
    if isinstance(cause, (CheckpointError, MisconfigurationException, ImportError)):  # ImportError: a missing extra
        return str(cause)
    if isinstance(cause, OSError) and not isinstance(cause, ConnectionError):
        if cause.filename is not None and cause.strerror:
            return f"{cause.strerror}: {cause.filename!r}. Check the path and its permissions."
        return str(cause)
    if isinstance(cause, RuntimeError) and str(cause).startswith("Error(s) in loading state_dict"):
        return f"the checkpoint's weights do not fit the model: {cause}"
    if type(cause).__module__.startswith(("wandb", "yaml")) and type(cause).__name__ in (
        "UsageError", "AuthenticationError", "YAMLError", "ScannerError", "ParserError"
    ):
        return str(cause)
    if isinstance(cause, (ValueError, TypeError, KeyError)) and _raised_in(
        cause, ("traincraft", "lightning", "jsonargparse")
    ):
        return str(cause)
    return None


def _debugging(argv: list[str]) -> tuple[bool, list[str]]:
    flag = _DEBUG_FLAG in argv
    rest = [arg for arg in argv if arg != _DEBUG_FLAG]
    return flag or os.environ.get(_DEBUG_ENV, "").lower() in ("1", "true", "yes"), rest


def _fail(error: Exception) -> NoReturn:
    """End the program for ``error`` (raised by the CLI, not in debug mode): the message and the exit status."""
    if isinstance(error, FloatingPointError) and _raised_in(error, ("traincraft",)):
        # training diverged (a non-finite step under on_nonfinite='raise'): a result, not a bug or a typo
        print(f"traincraft: error: FloatingPointError: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    from traincraft.callbacks.health_report import UnhealthyRunError

    if isinstance(error, UnhealthyRunError):  # HealthReport(fail_on=...): the run trained but is unhealthy
        print(f"traincraft: error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    message = _user_message(error)
    if message is not None:
        if _raised_in_callback(error):
            message += ("\nThe recipes turn on traincraft's monitors (trainer.callbacks); configure the one named "
                        "above, or pass --trainer.callbacks=[] for a plain Lightning fit without them.")
        print(f"traincraft: error: {message}", file=sys.stderr)
        raise SystemExit(2) from error
    traceback.print_exception(error)
    print(
        f"traincraft: internal error: {type(error).__name__}: {error}\nThis looks like a bug (in traincraft, a "
        f"library or your own module), not a configuration problem. Rerun with {_DEBUG_FLAG} (or "
        f"{_DEBUG_ENV}=1) to let the exception propagate, e.g. into a debugger, and report it with the "
        "traceback above.",
        file=sys.stderr,
    )
    raise SystemExit(1) from error

"""Writing a file so that a crash at any moment leaves the old file or the new one, never a cut one.

The bytes go to a temporary file beside the target (same filesystem), flushed and ``fsync``'d, renamed over the
target with ``os.replace`` and the directory ``fsync``'d. Temporary names carry the host and the writer's pid, so
the next save into a directory can drop those of writers of this host that were killed mid-save.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from contextlib import suppress

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _temporary_name(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _is_stale_temporary(entry: str) -> bool:
    """A temporary file of a save whose writer, a process of this host, is gone (killed mid-save)."""
    match = _TEMPORARY.match(entry)
    if match is None or match["host"] != _HOST or os.name == "nt":  # other hosts' writers cannot be checked
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a directory; the rename is already issued
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, pieces: list[memoryview | bytes]) -> None:
    """Temporary file beside ``path`` (same filesystem), flushed and fsync'd, renamed over it, directory fsync'd."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for entry in os.listdir(directory):  # left by a save that was killed: never a checkpoint, safe to drop
        if _is_stale_temporary(entry):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, entry))
    temporary = os.path.join(directory, _temporary_name(name))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)  # atomic on one filesystem: readers see the old file or the new one
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


"""Crash-safe, verified checkpoint files: :class:`SafeCheckpointIO` and :class:`CheckpointError`.

Lightning's :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` writes through fsspec, which stages
the bytes in the system temporary directory and "renames" them onto the target: across filesystems (tmpfs
``/tmp``, a network run directory) that rename is a copy, so a kill during it leaves a truncated ``last.ckpt`` and
the previous good one is gone. It also loads whatever ``torch.load`` accepts: flipped bytes in tensor data load
silently. This plugin writes every checkpoint crash-safe and seals it with a SHA-256 of its bytes, checked on
load; damaged, truncated, empty, foreign or missing files get one :class:`CheckpointError` naming the file, what is
wrong with it, and the other checkpoints of its directory to resume from instead. See ``docs/reliability.md``.

File layout: a checkpoint is the unchanged ``torch.save`` zip archive whose zip *comment* (the standard trailer of
the end-of-central-directory record) holds ``traincraft-checkpoint sha256=<64 hex digits>``: the hash of every
byte before the comment-length field. It stays a valid zip and a valid ``torch.load`` input, and checkpoint and
record are replaced by one atomic rename, so no crash can leave them out of step (a sidecar file could).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import socket
import zipfile
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import IO, Any, Optional

import torch
from fsspec.core import url_to_fs
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

__all__ = ["CheckpointError", "SafeCheckpointIO", "seal", "verify_checkpoint"]

_MAGIC = b"traincraft-checkpoint sha256="
_RECORD_LEN = len(_MAGIC) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory signature; the record is 22 bytes before its comment
_CHUNK = 1 << 22
_LISTED = 5  # other checkpoints verified and listed in an error message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read: damaged, truncated, empty, foreign or missing.

    The message names the file, says what is wrong and lists the other checkpoints of its directory. A
    ``ValueError``, so the ``traincraft`` command prints it in one line (exit status 2) instead of a traceback.
    """


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


def _digest(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(data: bytes | memoryview) -> list[memoryview | bytes]:
    """The pieces of a sealed checkpoint file, to be written in order: ``data`` is a ``torch.save`` zip archive.

    Raises:
        ValueError: if ``data`` is not a zip archive without comment (``torch.save``'s zip format).
    """
    view = memoryview(data)
    if len(view) < 22 or bytes(view[-22:-18]) != _EOCD or bytes(view[-2:]) != b"\0\0":
        raise ValueError(
            "seal() expects the bytes of torch.save's zip format (an archive with no comment); received "
            f"{len(view)} bytes ending in {bytes(view[-4:])!r}. Save with torch.save(obj, buffer) and the default "
            "_use_new_zipfile_serialization=True."
        )
    body = view[:-2]  # everything but the comment length, which the record changes
    record = _MAGIC + _digest(body).encode()
    return [body, _RECORD_LEN.to_bytes(2, "little"), record]


def _recorded_digest(f: IO[bytes], size: int) -> Optional[str]:
    """The sha256 recorded in the file's zip comment, or None if it has no traincraft record."""
    span = _RECORD_LEN + 22
    if size < span:
        return None
    f.seek(size - span)
    tail = f.read(span)
    if tail[:4] != _EOCD or tail[20:22] != _RECORD_LEN.to_bytes(2, "little") or not tail[22:].startswith(_MAGIC):
        return None
    return tail[len(_MAGIC) + 22 :].decode("ascii", errors="replace")


def _hash_prefix(f: IO[bytes], length: int) -> str:
    f.seek(0)
    digest = hashlib.sha256()
    while length > 0:
        chunk = f.read(min(_CHUNK, length))
        if not chunk:
            break
        digest.update(chunk)
        length -= len(chunk)
    return digest.hexdigest()


def _describe_foreign(head: bytes) -> str:
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras/h5py), not a PyTorch checkpoint"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array, not a PyTorch checkpoint"
    if head.startswith(b"GGUF"):
        return "a GGUF model file, not a PyTorch checkpoint"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file, not a Lightning checkpoint: load it with safetensors.torch.load_file()"
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c.isspace() for c in text):
            return f"a text file (it starts with {text[:24]!r}), not a PyTorch checkpoint"
        break
    return f"not a PyTorch checkpoint: it starts with unrecognized bytes {head[:8].hex(' ')}"


def _inspect(path: str) -> Optional[str]:
    """Checks ``path`` without unpickling it; returns its sha256 if it carries a record, None if it has none.

    Raises:
        CheckpointError: the file is missing, a directory, empty, truncated, damaged or foreign (one-line reason).
    """
    fs, local = url_to_fs(path)
    if not fs.exists(local):
        raise CheckpointError("does not exist")
    if fs.isdir(local):
        raise CheckpointError("is a directory, not a checkpoint file (a sharded checkpoint needs its strategy)")
    size = fs.size(local)
    if size == 0:
        raise CheckpointError("is empty (0 bytes): a save or copy of it was cut off before its bytes arrived")
    with fs.open(local, "rb") as f:
        recorded = _recorded_digest(f, size)
        if recorded is not None:
            found = _hash_prefix(f, size - _RECORD_LEN - 2)
            if found != recorded:
                raise CheckpointError(
                    f"is damaged: the sha256 of its {size} bytes is {found[:16]}..., not the {recorded[:16]}... "
                    "recorded when it was saved (bytes changed on disk or in transfer)"
                )
            return recorded
        f.seek(0)
        head = f.read(16)
        if head.startswith(b"\x80"):  # torch's legacy (pre-zip) format: torch.load decides
            return None
        if not b"PK\x03\x04".startswith(head[:4]):  # (a file cut inside the signature is a cut zip too)
            raise CheckpointError(f"is {_describe_foreign(head)}")
        f.seek(0)
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError):
            raise CheckpointError(
                f"is truncated or damaged: a zip archive of {size} bytes whose end record is missing "
                "(a save that was cut off, or an incomplete copy)"
            ) from None
        with archive:
            names = archive.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                raise CheckpointError(f"is a zip archive but not a PyTorch checkpoint (it holds {names[:3]})")
            if archive.comment.startswith(_MAGIC[:10]):
                raise CheckpointError("is damaged: its integrity record (the zip comment) is cut or altered")
            try:
                bad = archive.testzip()  # torch.load skips the zip CRC32s; an unsealed file still has them
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
                bad = f"? ({error})"
            if bad is not None:
                raise CheckpointError(f"is damaged: its record {bad!r} fails the zip CRC32 check")
    return None


def _others(path: str) -> str:
    """One sentence naming the usable checkpoints in the directory of ``path``, newest first, each verified."""
    fs, local = url_to_fs(path)
    shown = os.path.dirname(path) or "."
    try:
        entries = [e for e in fs.ls(os.path.dirname(local) or ".", detail=True) if e["type"] == "file"]
    except (FileNotFoundError, NotADirectoryError):
        return f"The directory {shown} does not exist either: check the path, or train without ckpt_path."
    name = os.path.basename(local)
    candidates = sorted(
        (e for e in entries if e["name"].endswith(".ckpt") and os.path.basename(e["name"]) not in (name, "")),
        key=lambda e: e.get("mtime") or e.get("created") or 0,
        reverse=True,
    )
    usable, unusable = [], []
    for entry in candidates[: 2 * _LISTED]:  # each check reads the whole file: bounded
        base = os.path.basename(entry["name"])
        try:
            state = "sealed, intact" if _inspect(entry["name"]) else "unsealed, CRC ok"
        except CheckpointError:
            unusable.append(base)
            continue
        stamp = entry.get("mtime")
        when = f", saved {datetime.fromtimestamp(stamp):%Y-%m-%d %H:%M:%S}" if stamp else ""
        usable.append(f"{base} ({state}{when})")
    bad = f" ({len(unusable)} more unusable: {', '.join(unusable)})" if unusable else ""
    if len(candidates) > 2 * _LISTED:
        bad += f" ({len(candidates) - 2 * _LISTED} older ones not checked)"
    if not usable:
        return f"No usable checkpoint was found in {shown}{bad}: train again without ckpt_path."
    return (
        f"Resume from another checkpoint in {shown} with ckpt_path=<file>, the best or the newest listed: "
        f"{', '.join(usable[:_LISTED])}{bad}."
    )


def _refuse(path: str, reason: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint {path} {reason}. {_others(path)}")


def verify_checkpoint(path: _PATH, require_record: bool = False) -> Optional[str]:
    """Checks a checkpoint file's integrity without unpickling it.

    Args:
        path: a local path or fsspec URL of a checkpoint file.
        require_record: refuse files that carry no integrity record (saved without :class:`SafeCheckpointIO`);
            by default they are accepted after their zip CRC32s are checked.

    Returns:
        The file's sha256 (hex) if it carries a record, else ``None``.

    Raises:
        CheckpointError: the file is missing, empty, truncated, damaged or not a PyTorch checkpoint; the message
            names it and lists the other checkpoints of its directory.
    """
    path = os.fspath(path)
    try:
        digest = _inspect(path)
    except CheckpointError as error:
        raise _refuse(path, str(error)) from None
    if digest is None and require_record:
        raise _refuse(path, "carries no integrity record (it was not saved by SafeCheckpointIO) and "
                            "require_record=True")
    return digest


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


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes checkpoints crash-safe and refuses damaged ones with a clear error.

    Saving: ``torch.save`` to memory, sealed with the sha256 of its bytes (in the zip comment, so the file stays a
    plain ``torch.load`` input), written to a temporary file *in the target's directory*, flushed, ``fsync``'d,
    renamed over the target with ``os.replace`` and the directory ``fsync``'d. A kill at any moment leaves the
    previous file intact; a save that raises removes its temporary file, and temporary files of a killed save
    (``.<name>.<host>-<pid>-<hex>.tmp``, hidden and not ``*.ckpt``, so Lightning never picks them) are deleted by
    the next save into that directory once their writer process is gone (files of other hosts are left). Remote fsspec URLs (``s3://``, ...) are written in one ``pipe`` call.

    Loading: the file is verified first (:func:`verify_checkpoint`), then read with ``weights_only=True`` unless
    the caller asks otherwise. Anything wrong raises :class:`CheckpointError` naming the file and the other
    checkpoints of its directory.

    Args:
        require_record: refuse checkpoints that carry no integrity record (saved by plain Lightning). Default
            ``False``: they load after their zip CRC32s check out.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()], logger=False, enable_progress_bar=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'SafeCheckpointIO'
    """

    def __init__(self, require_record: bool = False) -> None:
        super().__init__()
        if not isinstance(require_record, bool):
            raise TypeError(f"require_record must be True or False; received {require_record!r}.")
        self.require_record = require_record

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"SafeCheckpointIO takes no storage_options; received {storage_options!r}. Drop the argument, "
                "or write a CheckpointIO subclass that uses them."
            )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with buffer.getbuffer() as data:
            pieces = seal(data)
            fs, target = url_to_fs(os.fspath(path))
            if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                _write_atomically(target, pieces)
            else:  # object stores replace an object in one PUT
                fs.makedirs(os.path.dirname(target), exist_ok=True)
                fs.pipe(target, b"".join(bytes(p) for p in pieces))
            del pieces

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        path = os.fspath(path)
        verify_checkpoint(path, require_record=self.require_record)
        fs, local = url_to_fs(path)
        try:
            with fs.open(local, "rb") as f:
                checkpoint = torch.load(f, map_location=map_location, weights_only=weights_only is not False)
        except Exception as error:  # the bytes are as saved: the content itself is unreadable
            lines = [line for line in str(error).splitlines() if line.strip()]
            detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
            raise _refuse(
                path, f"could not be unpickled ({type(error).__name__}: {detail[:300]}); it may hold objects "
                "that weights_only=True refuses, or come from another program"
            ) from None
        if not isinstance(checkpoint, dict):
            raise _refuse(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
        if "state_dict" not in checkpoint and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise _refuse(
                path, f"is a bare state_dict ({len(checkpoint)} tensors, e.g. {next(iter(checkpoint))!r}), not a "
                "Lightning checkpoint: load it with model.load_state_dict(torch.load(path)) instead"
            )
        return checkpoint

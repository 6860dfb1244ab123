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
The byte format is ``_checkpoint_format.py``'s, the crash-safe write ``_atomic_write.py``'s.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from datetime import datetime
from typing import Any, Optional

import torch
from fsspec.core import url_to_fs
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from traincraft._atomic_write import _write_atomically
from traincraft._checkpoint_format import (
    _EOCD,
    _MAGIC,
    _RECORD_LEN,
    _describe_foreign,
    _digest,
    _hash_prefix,
    _recorded_digest,
)

__all__ = ["CheckpointError", "SafeCheckpointIO", "VerifiedLoading", "seal", "verify_checkpoint"]

_LISTED = 5  # other checkpoints verified and listed in an error message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read: damaged, truncated, empty, foreign or missing.

    The message names the file, says what is wrong and lists the other checkpoints of its directory. A
    ``ValueError``, so the ``traincraft`` command prints it in one line (exit status 2) instead of a traceback.
    """


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


class VerifiedLoading:
    """Mixin for a ``LightningModule`` or ``LightningDataModule``: ``load_from_checkpoint`` verifies the file with
    :func:`verify_checkpoint` before anything unpickles it, as the Trainer does with :class:`SafeCheckpointIO`.

    Put it first among the bases: ``class MyModule(VerifiedLoading, LightningModule)``. ``ImageClassifier`` and
    ``ImageDataModule`` do. An open file object is passed on unverified (it cannot be read twice).

    Example:
        >>> from lightning.pytorch import LightningModule
        >>> class Net(VerifiedLoading, LightningModule):
        ...     pass
        >>> Net.load_from_checkpoint("missing.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        traincraft.checkpoint.CheckpointError: Checkpoint missing.ckpt does not exist...
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(checkpoint_path, "read"):
            verify_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]


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

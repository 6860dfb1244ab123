"""The bytes of a sealed checkpoint: a ``torch.save`` zip archive whose zip comment records the SHA-256 of every
byte before the comment-length field, and how to read a file's head and tail without unpickling it."""

from __future__ import annotations

import hashlib
from typing import IO, Optional

_MAGIC = b"traincraft-checkpoint sha256="
_RECORD_LEN = len(_MAGIC) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory signature; the record is 22 bytes before its comment
_CHUNK = 1 << 22


def _digest(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


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


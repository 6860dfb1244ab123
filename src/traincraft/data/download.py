"""Downloading data files with checksum verification."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> file_digest(f.name, "md5")
        '900150983cd24fb0d6963f7d28e17f72'
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: str | os.PathLike, checksum: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``path`` unless a file with the right checksum is already there.

    The file is written under a temporary name and renamed only once its checksum matches, so an interrupted or
    corrupted download never leaves a file that looks complete.

    Args:
        url: where to fetch from (``http(s)://`` or ``file://``).
        path: destination file.
        checksum: ``"<algorithm>:<hex digest>"``, e.g. ``"md5:..."`` or ``"sha256:..."``.
        timeout: seconds to wait for the server.

    Returns:
        The destination path.
    """
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"checksum must look like 'sha256:<hex>' or 'md5:<hex>'; got {checksum!r}.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not the file to download {url} to; move it away or choose "
                                "another root.")
    if path.exists():
        if file_digest(path, algorithm) == expected.lower():
            return path
        raise ValueError(
            f"{path} exists but its {algorithm} is {file_digest(path, algorithm)}, not {expected}; it is corrupt or "
            "a different file. Delete it to download again."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OSError(f"downloading {url} to {path} failed: {error}. Check the address and the connection.") from error
    actual = file_digest(partial, algorithm)
    if actual != expected.lower():
        partial.unlink()
        raise ValueError(
            f"the file downloaded from {url} has {algorithm} {actual}, expected {expected}; it was deleted. The "
            "server sent a different or damaged file: try again, or check the address."
        )
    os.replace(partial, path)
    return path

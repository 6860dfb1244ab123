"""MNIST (and Fashion-MNIST) from the IDX files, raw or gzip-compressed."""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from traincraft.data._tensor_dataset import TensorImageDataset, holdout_splits
from traincraft.data.download import download
from traincraft.data.image_datamodule import ImageDataModule

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the gzip files as published with the data set
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): the magic number gives the element type and rank, then the sizes.

    Example:
        >>> import tempfile, struct
        >>> f = tempfile.NamedTemporaryFile(suffix="-idx1-ubyte", delete=False)
        >>> _ = f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 8, 9])); f.close()
        >>> read_idx(f.name).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip: BadGzipFile (OSError), EOFError when cut, zlib.error
        what = "a damaged or truncated gzip file" if path.suffix == ".gz" else "unreadable"
        raise ValueError(f"cannot read IDX file {path} ({what}): {type(error).__name__}: {error}. Download it "
                         "again.") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: it starts with {raw[:4].hex() or 'nothing (0 bytes)'}, and IDX files start "
            f"with 00 00, a type code ({', '.join(f'{c:02x}' for c in _DTYPES)}) and the rank. Download it again."
        )
    rank = raw[3]
    if len(raw) < 4 + 4 * rank:
        raise ValueError(
            f"{path} is truncated: its header declares rank {rank} ({4 + 4 * rank} header bytes) but the file holds "
            f"{len(raw)} bytes. Download it again."
        )
    shape = struct.unpack(f">{rank}I", raw[4 : 4 + 4 * rank])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * rank :]
    if len(body) != expected:
        raise ValueError(
            f"{path} is truncated or padded: its header promises shape {shape} ({expected} bytes of data) but it "
            f"holds {len(body)} bytes. Download it again."
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


class MNISTDataModule(ImageDataModule):
    """MNIST from its four IDX files in ``root`` (raw or ``.gz``), with a fixed validation split of the training
    set. With ``download=True`` missing files are fetched from ``url`` and checked against their published md5.

    Args:
        root: directory holding ``train-images-idx3-ubyte[.gz]`` and the three others.
        download: fetch missing files.
        url: base address of the files (the ``download`` source).
        val_size: training images held out for validation.
        split_seed: seed of the validation split.
        checksums: ``{file name: "md5:<hex>"}`` overriding the published checksums (for mirrors or variants such
            as Fashion-MNIST).
        **kwargs: loader, augmentation and normalization options of :class:`ImageDataModule`.

    Example:
        >>> dm = MNISTDataModule("data/mnist", batch_size=128, download=False)
        >>> dm.num_classes, dm.in_channels, dm.image_size  # files are read at setup()
        (10, 1, 28)
    """

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        url: str = "https://ossci-datasets.s3.amazonaws.com/mnist/",
        val_size: int = 5000,
        split_seed: int = 0,
        checksums: Optional[dict[str, str]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0; got {val_size}.")
        self.root, self.download, self.url, self.val_size, self.split_seed = Path(root), download, url, val_size, split_seed
        self.checksums = {name: f"md5:{md5}" for name, md5 in _MD5.items()} | dict(checksums or {})

    num_classes = 10
    in_channels = 1
    image_size = 28

    def _file(self, name: str) -> Path:
        for candidate in (self.root / name, self.root / f"{name}.gz"):
            if candidate.exists():
                return candidate
        if self.download:
            gz = f"{name}.gz"
            return download(self.url.rstrip("/") + "/" + gz, self.root / gz, self.checksums[gz])
        raise FileNotFoundError(
            f"{self.root / name}[.gz] not found. Put the MNIST IDX files in {self.root} or set download=True."
        )

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        image_file, label_file = (self._file(n) for n in _FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise ValueError(f"{image_file} must hold uint8 images (N, 28, 28); got {images.dtype} {images.shape}. "
                             "Is it an MNIST image file (the labels file is the other one)?")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{label_file} must hold integer labels (N,); got {labels.dtype} {labels.shape}. Is it an "
                             "MNIST label file (the images file is the other one)?")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{label_file} has labels in [{labels.min()}, {labels.max()}]; MNIST labels are 0-9. "
                             "Download the file again.")
        if len(labels) != len(images):
            raise ValueError(
                f"{label_file} holds {labels.shape} labels but {image_file} holds {len(images)} images; the files do "
                "not belong together."
            )
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    def build_datasets(self) -> dict[str, TensorImageDataset]:
        train = self._split("train")
        return holdout_splits(train, functools.partial(self._split, "test"), self.val_size, self.split_seed, num_classes=10)

"""CIFAR-10 and CIFAR-100 from the official binary-version files (no unpickling)."""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from traincraft.data._tensor_dataset import TensorImageDataset, holdout_splits
from traincraft.data.download import download
from traincraft.data.image_datamodule import ImageDataModule

_LAYOUT = {
    10: {"folder": "cifar-10-batches-bin", "label_bytes": 1, "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
         "test": ["test_batch.bin"], "archive": "cifar-10-binary.tar.gz", "md5": "c32a1d4ab5d03f1284b67883e8d87530"},
    100: {"folder": "cifar-100-binary", "label_bytes": 2, "train": ["train.bin"], "test": ["test.bin"],
          "archive": "cifar-100-binary.tar.gz", "md5": "03b5dce01913d631647c71ecec9e9cb8"},
}
_IMAGE_BYTES = 3 * 32 * 32


def read_cifar_binary(path: str | Path, label_bytes: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of ``label_bytes`` label bytes (CIFAR-100: coarse then fine; the last one is used) and a 3×32×32
    uint8 image in channel-major order. Returns uint8 images (N, 3, 32, 32) and int64 labels.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
        >>> _ = f.write(bytes([3]) + bytes(3072) + bytes([7]) + bytes([255]) * 3072); f.close()
        >>> x, y = read_cifar_binary(f.name, 1, 10)
        >>> tuple(x.shape), y.tolist(), int(x[1].min())
        ((2, 3, 32, 32), [3, 7], 255)
    """
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"cannot read CIFAR file {path}: {type(error).__name__}: {error}. Unpack the binary-version "
                         "archive again.") from error
    record = label_bytes + _IMAGE_BYTES
    if raw.size and raw[0] == 0x80:  # a pickle protocol 2+ header; CIFAR labels are < 100
        raise ValueError(
            f"{path} is a Python pickle (the CIFAR 'python version'), which traincraft never unpickles (unpickling "
            "can run code). Download the binary version (cifar-10-binary.tar.gz or cifar-100-binary.tar.gz) instead."
        )
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path} has {raw.size} bytes, not a whole number of {record}-byte records (label bytes + 3x32x32 image); "
            "the file is truncated or not a CIFAR binary-version file. Download it again."
        )
    records = raw.reshape(-1, record)
    labels = torch.from_numpy(records[:, label_bytes - 1].astype(np.int64))
    if int(labels.max()) >= num_classes:
        raise ValueError(
            f"{path} has label {int(labels.max())}, outside CIFAR-{num_classes}'s {num_classes} classes; is it a "
            f"CIFAR-{100 if num_classes == 10 else 10} file? Set num_classes accordingly."
        )
    images = torch.from_numpy(records[:, label_bytes:].copy()).view(-1, 3, 32, 32)
    return images, labels


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 read from the official *binary version* (``cifar-10-batches-bin`` or
    ``cifar-100-binary`` under ``root``), never from the Python-pickle version: unpickling untrusted files can run
    code. With ``download=True`` the archive is fetched, checked against its published md5 and unpacked.

    Args:
        root: directory holding (or receiving) the unpacked folder.
        num_classes: 10 or 100 (fine labels).
        download: fetch the archive when the folder is missing.
        url: base address of the archives.
        val_size: training images held out for validation.
        split_seed: seed of the validation split.
        checksum: ``"md5:<hex>"`` of the archive, overriding the published one (mirrors).
        **kwargs: loader, augmentation and normalization options of :class:`ImageDataModule`
            (default augmentation: the ``cifar`` preset).

    Example:
        >>> dm = CIFARDataModule("data/cifar", num_classes=100, whitening="zca", whitening_scope="image")
        >>> dm.num_classes, dm.in_channels, dm.image_size  # files are read at setup()
        (100, 3, 32)
    """

    def __init__(
        self,
        root: str = "data/cifar",
        num_classes: Literal[10, 100] = 10,
        download: bool = False,
        url: str = "https://www.cs.toronto.edu/~kriz/",
        val_size: int = 5000,
        split_seed: int = 0,
        checksum: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes not in _LAYOUT:
            raise ValueError(f"num_classes must be 10 or 100; got {num_classes!r}.")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0; got {val_size}.")
        self.root, self._num_classes, self.download, self.url = Path(root), num_classes, download, url
        self.val_size, self.split_seed = val_size, split_seed
        self.checksum = checksum or f"md5:{_LAYOUT[num_classes]['md5']}"

    @property
    def num_classes(self) -> int:
        return self._num_classes

    in_channels = 3
    image_size = 32

    def default_augment(self):
        from traincraft.augment.presets import cifar

        return cifar()

    def _folder(self) -> Path:
        layout = _LAYOUT[self._num_classes]
        folder = self.root / layout["folder"]
        if folder.is_dir():
            return folder
        pickled = self.root / ("cifar-10-batches-py" if self._num_classes == 10 else "cifar-100-python")
        if pickled.is_dir() and not self.download:
            raise FileNotFoundError(
                f"{folder} not found, but {pickled} holds the Python-pickle version, which traincraft never unpickles "
                f"(unpickling can run code). Unpack {layout['archive']} (the binary version) into {self.root}, or set "
                "download=True."
            )
        if not self.download:
            raise FileNotFoundError(
                f"{folder} not found. Unpack {layout['archive']} (the binary version) into {self.root}, or set "
                "download=True."
            )
        archive = download(self.url.rstrip("/") + "/" + layout["archive"], self.root / layout["archive"], self.checksum)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(self.root, filter="data")  # refuses absolute paths, links out of root, devices
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(f"cannot unpack {archive}: {type(error).__name__}: {error}. Delete it and download it "
                             "again.") from error
        if not folder.is_dir():
            raise ValueError(f"{archive} did not contain {layout['folder']}/; it is not the binary-version archive.")
        return folder

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        layout = _LAYOUT[self._num_classes]
        folder = self._folder()
        parts = []
        for name in layout[split]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing; the CIFAR folder is incomplete.")
            parts.append(read_cifar_binary(folder / name, layout["label_bytes"], self._num_classes))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def build_datasets(self) -> dict[str, TensorImageDataset]:
        train = self._read("train")
        return holdout_splits(train, functools.partial(self._read, "test"), self.val_size, self.split_seed, self._num_classes)

"""Class-per-folder image trees (the ImageNet layout), decoded in the loader workers."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from traincraft.data.image_datamodule import ImageDataModule

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_classes(folder: Path, classes: Optional[list[str]] = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders, or ``classes``) and ``(path, label)`` samples of a class-per-folder tree."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; expected one sub-folder of images per class.")
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>.jpg.")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{folder} has class folders {unknown} that the training split does not have.")
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        # not directories (a folder named x.jpg holds no image); broken links stay, to be reported when read
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.is_dir()) \
            if class_dir.is_dir() else []
        if not files and class_dir.is_dir():
            raise ValueError(
                f"class folder {class_dir} holds no images ({', '.join(EXTENSIONS)}); remove it or add images."
            )
        samples.extend((str(p), label) for p in files)
    return classes, samples


def _decode_failure(path: str, error: BaseException) -> str:
    """Why ``path`` could not be decoded, and what to do about it."""
    from PIL import Image

    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"{path} is larger than PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels, Pillow's guard "
                f"against decompression bombs ({error}). If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS in "
                "the training script (before the loaders start), or set it to None; otherwise delete the file")
    if isinstance(error, FileNotFoundError):
        return f"{path} does not exist (a broken link, or deleted after the folder was scanned)"
    return f"cannot decode image {path}: {type(error).__name__}: {error}. Fix or delete the file"


class ImageFolderDataset(Dataset):
    """Decodes one image file per item to a uint8 ``(C, size, size)`` tensor: the short side resized to ``size``
    (bilinear, antialiased by Pillow), then the central square. Unreadable files (empty, truncated, corrupt, not an
    image, missing, larger than ``PIL.Image.MAX_IMAGE_PIXELS``) raise a ``ValueError`` with their path, or with
    ``on_error="skip"`` return ``None`` (dropped and counted by :func:`collate_skipping`) after a warning naming
    the file."""

    def __init__(self, samples: list[tuple[str, int]], size: int, channels: int, on_error: str) -> None:
        self.samples, self.size, self.channels, self.on_error = samples, size, channels, on_error

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.size}|{self.channels}".encode())
        for path, label in self.samples:
            try:
                stat = os.stat(path)
            except OSError as error:
                if self.on_error == "raise":
                    raise ValueError(f"{_decode_failure(path, error)}, or set on_error='skip' to skip unreadable "
                                     "files (they are counted and reported).") from error
                digest.update(f"{path}|{label}|unreadable\n".encode())
                continue
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, int]]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with warnings.catch_warnings():
                # between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns, then decodes: refuse both the same way
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                array = self._decode(path)
        except Exception as error:  # Pillow raises many types on corrupt files (OSError, SyntaxError, struct.error...)
            if self.on_error == "raise":
                raise ValueError(f"{_decode_failure(path, error)}, or set on_error='skip' to skip unreadable files "
                                 "(they are counted and reported).") from error
            warnings.warn(f"skipping unreadable image: {_decode_failure(path, error)}.", stacklevel=1)
            return None
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), label

    def _decode(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB" if self.channels == 3 else "L")
            width, height = image.size
            scale = self.size / min(width, height)
            resized = image.resize((max(self.size, round(width * scale)), max(self.size, round(height * scale))),
                                   Image.BILINEAR)
            left, top = (resized.width - self.size) // 2, (resized.height - self.size) // 2
            return np.asarray(resized.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)


def collate_skipping(batch: list[Any], shape: tuple[int, ...] = (1, 1, 1)) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the decoded samples; the third element counts the skipped (unreadable) files of the batch. A batch of
    skipped files only is empty, with images of ``shape`` (channels, height, width)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.zeros(0, *shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), len(batch)
    images = torch.stack([item[0] for item in kept])
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return images, labels, len(batch) - len(kept)


class ImageFolderDataModule(ImageDataModule):
    """Images in ``root/train/<class>/*`` (and ``root/val``, ``root/test`` when present): the ImageNet layout.

    Files are decoded in the loader workers (``num_workers``) to uint8 squares of side ``image_size`` (short side
    resized, centre cropped); scale augmentation then runs batched on the device (the ``alexnet`` preset by
    default when ``image_size >= 256``). Without a ``val`` folder, ``val_fraction`` of the training files is held
    out. Grayscale files are converted to RGB with ``channels=3``. A corrupt or unreadable file raises an error
    with its path, or with ``on_error="skip"`` is skipped: a warning names it and :attr:`skipped_files` counts it.

    Args:
        root: the directory holding ``train/`` (and optionally ``val/``, ``test/``).
        image_size: side of the stored uint8 images.
        channels: 3 (RGB) or 1 (grayscale).
        val_fraction: share of the training files held out when there is no ``val/`` folder.
        split_seed: seed of that split.
        on_error: ``"raise"`` or ``"skip"`` unreadable files.
        **kwargs: loader, augmentation and normalization options of :class:`ImageDataModule`.

    Example:
        >>> dm = ImageFolderDataModule("data/imagenet", image_size=256, num_workers=8)
        >>> dm.in_channels, dm.image_size  # folders are scanned at setup()
        (3, 256)
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 256,
        channels: Literal[1, 3] = 3,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer; got {image_size!r}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels!r}.")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}.")
        self.root, self._image_size, self.channels = Path(root), image_size, channels
        self.val_fraction, self.split_seed, self.on_error = val_fraction, split_seed, on_error
        self.classes: list[str] = []
        self.skipped_files = 0

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.classes, _ = scan_classes(self.root / "train")
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def image_size(self) -> int:
        return self._image_size

    def default_augment(self):
        from traincraft.augment.presets import alexnet

        if self.channels == 3 and self._image_size >= 256:
            return alexnet(size=224 * self._image_size // 256)
        return None

    def build_datasets(self) -> dict[str, Dataset]:
        self.classes, train = scan_classes(self.root / "train")
        splits = {}
        if (self.root / "val").is_dir():
            splits["val"] = scan_classes(self.root / "val", self.classes)[1]
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            held = max(1, round(len(train) * self.val_fraction))
            splits["val"] = [train[i] for i in sorted(order[:held])]
            train = [train[i] for i in sorted(order[held:])]
        if (self.root / "test").is_dir():
            splits["test"] = scan_classes(self.root / "test", self.classes)[1]
        splits["train"] = train
        return {name: ImageFolderDataset(s, self._image_size, self.channels, self.on_error) for name, s in splits.items()}

    def collate_fn(self, split: str):
        return functools.partial(collate_skipping, shape=(self.channels, self._image_size, self._image_size))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, skipped = batch
        if skipped:  # a host integer: counting costs no device sync
            self.skipped_files += skipped
            warnings.warn(f"{type(self).__name__} has skipped {self.skipped_files} unreadable image file(s) so far "
                          "(on_error='skip'; each one is named in a warning of its own).", stacklevel=2)
        return images, labels

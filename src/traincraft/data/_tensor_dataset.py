"""An in-memory image dataset whose loader fetches whole batches at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` held in memory.

    ``__getitems__`` lets the ``DataLoader`` fetch a batch with one indexing operation instead of N calls and a
    collate; pair it with :func:`collate_batched`.

    Args:
        images: uint8 tensor of shape ``(N, C, H, W)``.
        labels: integer tensor of shape ``(N,)``; ``None`` for unlabelled (prediction) data.
        num_classes: when given, every label must lie in ``[0, num_classes)``.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 1]), 3)
        >>> x, y = ds.__getitems__([0, 2])
        >>> tuple(x.shape), y.tolist()
        ((2, 1, 8, 8), [0, 2])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W); got {got}. Convert with "
                "`(x * 255).round().clamp(0, 255).to(torch.uint8)` for floats in [0, 1] and add a channel axis for "
                "grayscale images."
            )
        if labels is not None:
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"labels must have shape ({images.shape[0]},) to match {images.shape[0]} images; "
                    f"got {tuple(labels.shape)}."
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}.")
            labels = labels.to(torch.int64)
            if num_classes is not None and labels.numel():
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= num_classes:
                    raise ValueError(
                        f"labels must lie in [0, {num_classes}) for num_classes={num_classes}; found labels in "
                        f"[{low}, {high}]. Fix num_classes or remap the labels."
                    )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Any:
        if self.labels is None:
            return self.images[index]
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> Any:
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.labels is None:
            return self.images[index]
        return self.images[index], self.labels[index]


def collate_batched(batch: Any) -> Any:
    """Collate for :class:`TensorImageDataset`: batches arrive already stacked, so pass them through."""
    return batch


def holdout_splits(train: tuple[torch.Tensor, torch.Tensor], read_test: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                   val_size: int, split_seed: int, num_classes: int) -> dict[str, TensorImageDataset]:
    """``train``, ``val`` and ``test`` datasets from a file format's training ``(images, labels)`` and the reader of
    its test ones (called once the split is known to be possible): the validation set is ``val_size`` training
    examples drawn with ``split_seed``."""
    images, labels = train
    if val_size >= len(images):
        raise ValueError(f"val_size={val_size} leaves no training images out of {len(images)}.")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    val, rest = order[:val_size], order[val_size:]
    test_images_labels = read_test()
    return {
        "train": TensorImageDataset(images[rest], labels[rest], num_classes=num_classes),
        "val": TensorImageDataset(images[val], labels[val], num_classes=num_classes),
        "test": TensorImageDataset(*test_images_labels, num_classes=num_classes),
    }

"""The statistics pass of an ImageDataModule: float64 sums over the training images, all-reduced under DDP, cached
on disk under a key of the data and the options."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from traincraft.data._tensor_dataset import TensorImageDataset
from traincraft.data.statistics import moment_sums, statistics_from_sums


def dataset_batches(dataset: Dataset, rank: int, world: int, num_workers: int, collate_fn: Any) -> Iterator[torch.Tensor]:
    """The uint8 images of every ``world``-th example from ``rank`` on, in batches."""
    if isinstance(dataset, TensorImageDataset):
        yield from dataset.images[rank::world].split(1024)
        return
    if world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))
    for batch in DataLoader(dataset, batch_size=256, num_workers=num_workers, collate_fn=collate_fn):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if images.shape[0]:  # a batch whose files were all skipped as unreadable is empty
            yield images


def tensor_fingerprint(images: torch.Tensor) -> str:
    """A hash of in-memory images: their shape and bytes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_path(directory: Optional[str], fingerprint: Optional[str], options: dict[str, Any]) -> Optional[str]:
    """Where the statistics of the data ``fingerprint`` names, computed with ``options``, are cached; ``None``
    without a cache directory or a fingerprint."""
    if directory is None or fingerprint is None:
        return None
    key = hashlib.sha256(f"{fingerprint}|{sorted(options.items())}".encode()).hexdigest()[:32]
    return os.path.join(directory, f"statistics-{key}.pt")


def compute_statistics(
    train_images: Callable[[int, int], Iterable[torch.Tensor]],
    whitening: Optional[str],
    whitening_scope: str,
    whitening_epsilon: float,
    path: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """:func:`~traincraft.data.statistics_from_sums` of the images ``train_images(rank, world)`` yields on each
    rank, or the cached ones at ``path``; rank 0 writes the cache."""
    if path is not None and os.path.exists(path):
        return torch.load(path, weights_only=True)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sums = moment_sums(train_images(rank, world), feature_covariance=whitening is not None and whitening_scope == "image")
    if distributed:
        # each rank summed its own share; the sums add up to those of the whole split
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        for key in sorted(sums):
            total = sums[key].to(device)
            dist.all_reduce(total)
            sums[key] = total.cpu()
    stats = statistics_from_sums(sums, whitening, whitening_epsilon)
    if path is not None and rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(stats, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a concurrent reader never sees half a file
    return stats

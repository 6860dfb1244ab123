"""An ImageDataModule's on-device pipeline apart from normalization: the augmentation module an ``augment`` option
names, the image size it outputs, the fancy-PCA ops that wait for the training statistics, the seeded stream of
augmentation draws, and the checks and centre crop of evaluation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from traincraft.augment import PRESETS
from traincraft.augment.crop import RandomCrop
from traincraft.augment.fancy_pca import FancyPCALighting
from traincraft.augment.scale_jitter import ScaleJitterCrop


def resolve_augment(augment: Union[str, nn.Module, None], default: Callable[[], Optional[nn.Module]]) -> Optional[nn.Module]:
    """The module of an ``augment`` option: itself, ``default()`` for ``"default"``, none, or a preset."""
    if isinstance(augment, nn.Module):
        return augment
    if augment == "default":
        return default()
    if augment in (None, "none"):
        return None
    return PRESETS[augment]()


def model_input_size(eval_crop: Union[int, str], augment: Optional[nn.Module], image_size: int) -> int:
    """``eval_crop`` when it is a size, else the side of the images ``augment`` outputs from ``image_size`` ones,
    as its last crop op (``ScaleJitterCrop``, ``RandomCrop``) sets it; a crop inside a foreign module is not seen."""
    if isinstance(eval_crop, int) and not isinstance(eval_crop, bool):
        return int(eval_crop)
    size = image_size
    for module in augment.modules() if augment is not None else ():
        if isinstance(module, ScaleJitterCrop):
            size = module.size
        elif isinstance(module, RandomCrop):
            height, width = module.size
            if height != width:
                raise ValueError(f"the models take square images; the augmentation crops to {height}x{width}.")
            size = width
    return size


def eval_crop_size(eval_crop: Union[int, str], augment: Optional[nn.Module], channels: int,
                   image_size: int) -> Optional[int]:
    """The centre crop of evaluation images: ``eval_crop`` when a size; with ``"auto"`` the side of ``augment``'s
    output on one ``image_size`` image when it differs; ``None``: no crop."""
    if eval_crop == "none":
        return None
    if eval_crop != "auto":
        return int(eval_crop)
    if augment is None:
        return None
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # a probe: leaves the global stream untouched
        out = augment(torch.full((1, channels, image_size, image_size), 0.5))
    return None if tuple(out.shape[-2:]) == (image_size, image_size) else int(out.shape[-1])


def lighting_modules(augment: Optional[nn.Module]) -> list[FancyPCALighting]:
    if augment is None:
        return []
    return [m for m in augment.modules() if isinstance(m, FancyPCALighting)]


def fit_lighting(augment: Optional[nn.Module], statistics: Mapping[str, torch.Tensor], owner: str, channels: int,
                 force: bool = False) -> None:
    """Hand the pixel colours' principal components to every fancy-PCA op of ``augment`` that has none (all of
    them with ``force``)."""
    for module in lighting_modules(augment):
        if module.fitted and not force:
            continue
        if "pixel_eigenvalues" not in statistics or statistics["pixel_eigenvalues"].numel() != 3:
            raise ValueError(
                f"FancyPCALighting needs RGB training images; {owner} has {channels} "
                "channel(s). Remove it from the augmentation pipeline."
            )
        module.set_principal_components(statistics["pixel_eigenvalues"], statistics["pixel_eigenvectors"])


def augmentation_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one batch's augmentation draws: reproducible from ``seed``, different on every rank and step.

    ``seed_everything`` gives every DDP rank the same global seed, so the rank must be mixed in explicitly.

    Example:
        >>> augmentation_seed(0, 0, 5) == augmentation_seed(0, 0, 5) != augmentation_seed(0, 1, 5)
        True
    """
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _data_rank(trainer: Any) -> int:
    # Ranks that hold different parts of one model replica (column parallelism) read the same batch and must
    # augment it identically: such strategies expose the replica's index as `data_parallel_rank`.
    return getattr(getattr(trainer, "strategy", None), "data_parallel_rank", trainer.global_rank)


@contextmanager
def augmentation_stream(seed: int, device: torch.device, trainer: Any) -> Iterator[None]:
    """Run the enclosed augmentation under the seed of this batch (:func:`augmentation_seed` of ``seed``, the data
    rank and the batch counter), leaving the global random streams as they were."""
    # Batches already drawn in this run (all epochs), restored with the loop state on resume.
    step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(augmentation_seed(seed, _data_rank(trainer), step))
        yield


def check_image_batch(images: torch.Tensor, channels: int, owner: str) -> None:
    """Refuse a batch that is not uint8 ``(N, channels, H, W)`` (shapes only: no host synchronization)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{owner} expects uint8 image batches of shape (N, C, H, W) from its loaders; got a "
            f"{images.dtype} tensor of shape {tuple(images.shape)}. Datasets must yield uint8 (C, H, W) images."
        )
    if images.shape[1] != channels:
        raise ValueError(f"expected images with {channels} channels; got {images.shape[1]} (shape {tuple(images.shape)}).")


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window of images ``(..., H, W)`` (a view)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"eval_crop={size} is larger than the {x.shape[-2]}x{x.shape[-1]} images; lower it.")
    return x[..., top : top + size, left : left + size]

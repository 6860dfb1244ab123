"""An image grid of augmented samples, saved as PNG and logged once at the start of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from traincraft.loggers import log_image


def gallery_grid(images: torch.Tensor, augment: nn.Module, rows: int = 4, seed: int = 0, pad: int = 2) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` grid: the first row holds the images, each further row one augmented draw of them.

    Draws run under a forked RNG seeded with ``seed``, so the gallery is reproducible and the training stream is
    untouched. Originals are centre-cropped to the augmented size when the pipeline changes it.

    Args:
        images: uint8 ``(N, C, H, W)`` or float in ``[0, 1]``.
        augment: the augmentation pipeline.
        rows: augmented rows below the originals.
        seed: seed of the draws.
        pad: white pixels between tiles.

    Example:
        >>> from traincraft.augment.presets import digits
        >>> gallery_grid(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), digits(), rows=2).shape
        torch.Size([3, 36, 36])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}.")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        draws = [augment(x).clamp(0, 1) for _ in range(rows)]
    h, w = draws[0].shape[-2:]
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    originals = x[..., top : top + h, left : left + w] if top >= 0 and left >= 0 else F.interpolate(x, size=(h, w))
    tiles = torch.stack([originals, *draws])  # (rows + 1, N, C, h, w)
    if tiles.shape[2] == 1:
        tiles = tiles.expand(-1, -1, 3, -1, -1)
    tiles = F.pad(tiles, [pad, pad, pad, pad], value=1.0)
    r, n, c, th, tw = tiles.shape
    grid = tiles.permute(2, 0, 3, 1, 4).reshape(c, r * th, n * tw)
    return (grid * 255).round().to(torch.uint8)


class AugmentationGallery(Callback):
    """At the start of training, show what the DataModule's augmentation does: a grid of ``num_images`` training
    images (top row) and ``rows`` augmented draws of them, sent once to every W&B and TensorBoard logger and, with
    ``path``, written as a PNG. People look rather than read: a wrong crop size or a colour jitter that is too
    strong is obvious in the picture.

    Logged (image, not scalars):

    ============================ =============================================
    key                          content
    ============================ =============================================
    ``augmentation/gallery``     the grid (uint8 RGB), once per run
    ============================ =============================================

    Args:
        num_images: training images per row.
        rows: augmented draws per image.
        path: PNG file to write (``None``: none).
        seed: seed of the draws (the training stream is untouched).

    Example:
        >>> AugmentationGallery(num_images=4, path="runs/gallery.png").rows
        4
    """

    def __init__(self, num_images: int = 8, rows: int = 4, path: Optional[str] = None, seed: int = 0) -> None:
        if num_images <= 0 or rows <= 0:
            raise ValueError(f"num_images and rows must be positive; got {num_images} and {rows}.")
        self.num_images, self.rows, self.path, self.seed = num_images, rows, path, seed
        self.logged = False

    @property
    def state_key(self) -> str:
        return f"AugmentationGallery{{num_images={self.num_images}, rows={self.rows}}}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logged:  # once per run, also across resumes
            return
        self.logged = True
        datamodule = getattr(trainer, "datamodule", None)
        augment = getattr(datamodule, "_augment_module", None)
        dataset = getattr(datamodule, "datasets", {}).get("train")
        if augment is None or dataset is None:
            return
        self._show(trainer, augment, dataset)

    @rank_zero_only
    def _show(self, trainer: pl.Trainer, augment: nn.Module, dataset: Any) -> None:
        count = min(self.num_images, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)])
        grid = gallery_grid(images, augment, rows=self.rows, seed=self.seed)
        log_image(trainer, "augmentation/gallery", grid, step=trainer.global_step, caption="top: originals")
        if self.path is not None:
            save_png(grid, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"logged": self.logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged = bool(state_dict.get("logged", False))


def save_png(grid: torch.Tensor, path: str) -> Path:
    """Write a uint8 ``(C, H, W)`` image as PNG, creating the folder."""
    from PIL import Image

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(out)
    return out

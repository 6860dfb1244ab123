"""A pipeline of augmentation ops, buildable from YAML."""

from __future__ import annotations

import torch
from torch import nn


class Compose(nn.Sequential):
    """Apply ``ops`` in order; each draws its own per-sample parameters.

    The input batch is never modified; intermediate batches are, by ops that offer an in-place ``forward_``.

    Args:
        ops: the augmentation modules (traincraft ops, kornia augmentations, or any batch-to-batch module).

    Example:
        >>> import torch
        >>> from traincraft.augment.flip import RandomHorizontalFlip
        >>> from traincraft.augment.noise import GaussianNoise
        >>> Compose([RandomHorizontalFlip(), GaussianNoise(0.01)])(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])

    From YAML (``data.init_args.augment``)::

        class_path: traincraft.augment.compose.Compose
        init_args:
          ops:
            - {class_path: traincraft.augment.crop.RandomCrop, init_args: {size: 32, padding: 4}}
            - {class_path: traincraft.augment.flip.RandomHorizontalFlip, init_args: {p: 0.5}}
    """

    def __init__(self, ops: list[nn.Module]) -> None:
        bad = [type(op).__name__ for op in ops if not isinstance(op, nn.Module)]
        if bad:
            raise TypeError(f"every op must be an nn.Module; got {bad}.")
        super().__init__(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original = x
        for op in self:
            # Once an op has produced a fresh tensor the pipeline owns it, and ops with an in-place variant
            # (`forward_`) may overwrite it: on CPU a fresh image-sized allocation costs as much as the op itself.
            owned = x is not original and x._base is None and not x.requires_grad
            x = op.forward_(x) if owned and hasattr(op, "forward_") else op(x)
        return x

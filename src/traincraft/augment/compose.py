"""A pipeline of augmentation ops, buildable from YAML."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Compose(nn.Sequential):
    """Apply ``ops`` in order; each draws its own per-sample parameters.

    The input batch is never modified; intermediate batches are, by ops that offer an in-place ``forward_``. A
    resample followed by fancy-PCA lighting (the ``alexnet`` preset) runs fused: the colour offsets are added as the
    resample writes its output, with the same draws and the same result as running the two ops one after the other.

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
        original, ops, i = x, list(self), 0
        while i < len(ops):
            op, following = ops[i], ops[i + 1] if i + 1 < len(ops) else None
            if _fuses(op, following, x):
                # A resample followed by a per-sample colour offset (fancy-PCA lighting): the offset is added as the
                # resample writes each block, saving a pass over the batch. Same draws, same result.
                x, i = op.forward_with_offsets(x, following.channel_offsets), i + 2
                continue
            # Once an op has produced a fresh tensor the pipeline owns it, and ops with an in-place variant
            # (`forward_`) may overwrite it: on CPU a fresh image-sized allocation costs as much as the op itself.
            owned = x is not original and x._base is None and not x.requires_grad
            in_place = owned and hasattr(op, "forward_") and not _hooked(op)
            x, i = (op.forward_(x) if in_place else op(x)), i + 1
        return x


def _fuses(op: nn.Module, following: Optional[nn.Module], x: torch.Tensor) -> bool:
    if following is None or not hasattr(op, "forward_with_offsets") or not hasattr(following, "fusable_offsets"):
        return False
    if _hooked(op) or _hooked(following):
        return False
    try:
        return following.fusable_offsets(x)
    except (ValueError, RuntimeError):  # let the unfused ops raise, in their own order
        return False


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks are registered on ``module``: it must then be called, not bypassed by a fast path."""
    return bool(module._forward_hooks or module._forward_pre_hooks)

"""Named augmentation pipelines: plain functions returning a batched, on-device module."""

from __future__ import annotations

import kornia.augmentation as K
from torch import nn


def digits() -> nn.Module:
    """Light augmentation for small grayscale digits: a small random affine warp, then pixel noise.

    Each sample draws its own parameters. No flips: a mirrored digit is a different (or no) digit.
    Inputs are float images in ``[0, 1]`` of shape ``(N, C, H, W)``.

    Example:
        >>> import torch
        >>> aug = digits()
        >>> aug(torch.rand(4, 1, 32, 32)).shape
        torch.Size([4, 1, 32, 32])
    """
    return K.AugmentationSequential(
        K.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5.0, p=1.0),
        K.RandomGaussianNoise(mean=0.0, std=0.03, p=0.5),
    )

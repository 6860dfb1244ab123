"""Named augmentation pipelines: plain functions returning a batched, on-device module."""

from __future__ import annotations

from torch import nn

from traincraft.augment.color import ColorJitter
from traincraft.augment.compose import Compose
from traincraft.augment.crop import RandomCrop
from traincraft.augment.elastic import RandomElastic
from traincraft.augment.fancy_pca import FancyPCALighting
from traincraft.augment.flip import RandomHorizontalFlip
from traincraft.augment.scale_jitter import ScaleJitterCrop


def digits(magnitude: float = 0.016, smoothness: float = 0.15) -> nn.Module:
    """Elastic distortion for handwritten digits (Simard, Steinkraus & Platt 2003): every sample is warped by its
    own smooth random displacement field, by about half a pixel at 32×32.

    Stronger settings and the affine warps (rotation, shift, scale, shear) did worse on scikit-learn's digits, which
    are centred and size-normalized: `docs/augmentation.md` has the sweep. No flips: a mirrored digit is a
    different (or no) digit. Inputs are float images in ``[0, 1]`` of shape ``(N, C, H, W)``.

    Args:
        magnitude: standard deviation of the displacement, as a fraction of the image side.
        smoothness: correlation length of the field (σ of its Gaussian smoothing), as a fraction of the side.

    Example:
        >>> import torch
        >>> aug = digits()
        >>> aug(torch.rand(4, 1, 32, 32)).shape
        torch.Size([4, 1, 32, 32])
    """
    return Compose([RandomElastic(magnitude=magnitude, smoothness=smoothness, p=1.0)])


def cifar(size: int = 32, padding: int = 4) -> nn.Module:
    """The CIFAR recipe: pad by 4 and take a random 32×32 crop, mirror half of the images, and jitter the
    brightness, contrast and saturation of half of them by up to ±20%.

    Example:
        >>> import torch
        >>> cifar()(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    return Compose([
        RandomCrop(size, padding=padding),
        RandomHorizontalFlip(p=0.5),
        ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, p=0.5),
    ])


def alexnet(min_size: int = 256, max_size: int = 480, size: int = 224, sigma: float = 0.1) -> nn.Module:
    """The ImageNet recipe of AlexNet and its successors: short side L ~ U[256, 480] then a random 224 crop,
    horizontal mirroring, and fancy-PCA lighting with σ = 0.1 (its principal components come from the training
    split when an ImageDataModule runs the pipeline).

    Example:
        >>> import torch
        >>> aug = alexnet(min_size=40, max_size=60, size=32)
        >>> aug[1].set_principal_components(torch.tensor([0.05, 0.01, 0.001]), torch.eye(3))
        >>> aug(torch.rand(2, 3, 48, 48)).shape
        torch.Size([2, 3, 32, 32])
    """
    return Compose([
        ScaleJitterCrop(min_size=min_size, max_size=max_size, size=size, flip=0.5),  # mirroring folded in
        FancyPCALighting(sigma=sigma),
    ])

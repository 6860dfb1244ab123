"""Batched on-device augmentation: per-sample parameters, one resample per batch, only selected samples computed."""

from traincraft.augment.color import ColorJitter
from traincraft.augment.compose import Compose
from traincraft.augment.crop import RandomCrop
from traincraft.augment.elastic import RandomElastic
from traincraft.augment.fancy_pca import FancyPCALighting
from traincraft.augment.flip import RandomHorizontalFlip
from traincraft.augment.gallery import AugmentationGallery, gallery_grid
from traincraft.augment.geometry import RandomGeometry
from traincraft.augment.noise import GaussianNoise
from traincraft.augment.presets import alexnet, cifar, digits
from traincraft.augment.scale_jitter import ScaleJitterCrop
from traincraft.augment.tta import MultiCropAveraging

PRESETS = {"digits": digits, "cifar": cifar, "alexnet": alexnet}

__all__ = [
    "PRESETS",
    "AugmentationGallery",
    "ColorJitter",
    "Compose",
    "FancyPCALighting",
    "GaussianNoise",
    "MultiCropAveraging",
    "RandomCrop",
    "RandomElastic",
    "RandomGeometry",
    "RandomHorizontalFlip",
    "ScaleJitterCrop",
    "alexnet",
    "cifar",
    "digits",
    "gallery_grid",
]

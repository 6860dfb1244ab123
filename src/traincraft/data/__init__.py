"""LightningDataModules whose batches are augmented and normalized on the device."""

from traincraft.data._sampler import EpochShuffleSampler
from traincraft.data._tensor_dataset import TensorImageDataset, collate_batched
from traincraft.data.digits import DigitsDataModule
from traincraft.data.image_datamodule import ImageDataModule, augmentation_seed
from traincraft.data.statistics import channel_moments

__all__ = [
    "DigitsDataModule",
    "EpochShuffleSampler",
    "ImageDataModule",
    "TensorImageDataset",
    "augmentation_seed",
    "channel_moments",
    "collate_batched",
]

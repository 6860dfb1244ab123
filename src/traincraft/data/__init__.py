"""LightningDataModules whose batches are augmented and normalized on the device, and the readers behind them."""

from traincraft.data._sampler import EpochShuffleSampler
from traincraft.data._tensor_dataset import TensorImageDataset, collate_batched
from traincraft.data.cifar import CIFARDataModule, read_cifar_binary
from traincraft.data.class_interleaved_sampler import ClassInterleavedSampler
from traincraft.data.digits import DigitsDataModule
from traincraft.data.download import download, file_digest
from traincraft.data.hard_example_sampler import HardExampleSampler
from traincraft.data.image_datamodule import ImageDataModule, augmentation_seed
from traincraft.data.image_folder import ImageFolderDataModule
from traincraft.data.mnist import MNISTDataModule, read_idx
from traincraft.data.normalization import Normalization
from traincraft.data.optimize import optimize_image_folder
from traincraft.data.statistics import channel_moments, moment_sums, statistics_from_sums, whitening_matrix
from traincraft.data.streaming_image_datamodule import StreamingImageDataModule

__all__ = [
    "CIFARDataModule",
    "ClassInterleavedSampler",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "HardExampleSampler",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "Normalization",
    "StreamingImageDataModule",
    "TensorImageDataset",
    "augmentation_seed",
    "channel_moments",
    "collate_batched",
    "download",
    "file_digest",
    "moment_sums",
    "optimize_image_folder",
    "read_cifar_binary",
    "read_idx",
    "statistics_from_sums",
    "whitening_matrix",
]

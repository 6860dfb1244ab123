"""A small in-memory RGB DataModule for tests: correlated colour channels, so whitening and PCA have work to do."""

import torch

from traincraft.data._tensor_dataset import TensorImageDataset
from traincraft.data.image_datamodule import ImageDataModule


def correlated_rgb(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size, size, generator=g)
    mix = torch.tensor([[0.8], [0.6], [0.3]])  # every channel follows one luminance, plus its own part
    x = mix.view(1, 3, 1, 1) * base + 0.25 * torch.rand(n, 3, size, size, generator=g)
    return (x / x.amax() * 255).round().to(torch.uint8)


class SyntheticRGB(ImageDataModule):
    def __init__(self, size: int = 8, train: int = 96, classes: int = 3, data_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size, self.train, self.classes, self.data_seed = size, train, classes, data_seed

    @property
    def num_classes(self) -> int:
        return self.classes

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.size

    def build_datasets(self):
        x = correlated_rgb(self.train + 32, self.size, self.data_seed)
        y = torch.arange(len(x)) % self.classes
        return {"train": TensorImageDataset(x[: self.train], y[: self.train]),
                "val": TensorImageDataset(x[self.train :], y[self.train :])}

"""The handwritten digits that scikit-learn ships: no download needed."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from traincraft.augment import digits as digits_augment
from traincraft.data._tensor_dataset import TensorImageDataset
from traincraft.data.image_datamodule import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """The 1,797 8×8 grayscale digits of scikit-learn, resized to ``image_size``, in a fixed stratified split.

    The split depends only on ``split_seed`` (not on the training seed), so runs with different seeds are
    evaluated on the same test images. Images are resized once, at setup, and kept in memory as uint8.

    Args:
        image_size: side of the square images the model sees (the originals are 8×8).
        val_fraction: fraction of all images held out for validation.
        test_fraction: fraction of all images held out for testing.
        split_seed: seed of the stratified split.
        train_fraction: keep only this fraction of the training split (a stratified subset, fixed by
            ``split_seed``; validation and test are unchanged): the small-data regime where augmentation and
            regularization matter, and the points of a learning curve.
        batch_size, eval_batch_size, num_workers, pin_memory, augment, normalize, seed, drop_last, whitening,
            whitening_scope, whitening_epsilon, statistics_cache, sampler, interleave_spacing: as in
            :class:`ImageDataModule`.

    Example:
        >>> dm = DigitsDataModule(image_size=16, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.dtype, tuple(x.shape), dm.num_classes, [len(dm.datasets[s]) for s in ("train", "val", "test")]
        (torch.uint8, (32, 1, 16, 16), 10, [1257, 180, 360])
    """

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        train_fraction: float = 1.0,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        augment: Union[str, nn.Module, None] = "default",
        normalize: bool = True,
        seed: Optional[int] = None,
        drop_last: bool = True,
        whitening: Optional[Literal["pca", "zca"]] = None,
        whitening_scope: Literal["channel", "image"] = "image",
        whitening_epsilon: float = 1e-2,
        statistics_cache: Optional[str] = None,
        sampler: Literal["shuffle", "class_interleaved"] = "shuffle",
        interleave_spacing: Literal["stratified", "random"] = "stratified",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            augment=augment,
            normalize=normalize,
            seed=seed,
            drop_last=drop_last,
            whitening=whitening,
            whitening_scope=whitening_scope,
            whitening_epsilon=whitening_epsilon,
            statistics_cache=statistics_cache,
            sampler=sampler,
            interleave_spacing=interleave_spacing,
        )
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer; got {image_size!r}.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1); got {value}.")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in (0, 1]; got {train_fraction}.")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction:.2f} leaves too little to train on; "
                "keep the sum below 0.9."
            )
        # A module object is not a hyperparameter (and would not load with weights_only).
        self.save_hyperparameters(ignore=["augment"] if isinstance(augment, nn.Module) else None)
        self._image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_fraction = train_fraction

    num_classes = 10
    in_channels = 1

    @property
    def image_size(self) -> int:
        return self._image_size

    def default_augment(self) -> nn.Module:
        return digits_augment()

    def build_datasets(self) -> dict[str, TensorImageDataset]:
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        if self._image_size != images.shape[-1]:
            images = F.interpolate(images, size=self._image_size, mode="bilinear", align_corners=False)
        images = images.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        labels = torch.from_numpy(digits.target).long()
        index = torch.arange(len(labels)).numpy()
        rest, test = train_test_split(
            index, test_size=self.test_fraction, stratify=labels.numpy(), random_state=self.split_seed
        )
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=labels.numpy()[rest],
            random_state=self.split_seed,
        )
        if self.train_fraction < 1.0:
            keep = max(10, round(self.train_fraction * len(train)))  # at least one image per class
            if keep < len(train):
                train, _ = train_test_split(train, train_size=keep, stratify=labels.numpy()[train],
                                            random_state=self.split_seed)
        return {
            name: TensorImageDataset(images[idx], labels[idx], num_classes=10)
            for name, idx in (("train", train), ("val", val), ("test", test))
        }

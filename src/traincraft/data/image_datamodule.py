"""Base DataModule: uint8 batches from the loader, augmentation and normalization on the device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from traincraft.augment import PRESETS
from traincraft.data._sampler import EpochShuffleSampler
from traincraft.data._tensor_dataset import TensorImageDataset, collate_batched
from traincraft.data.statistics import channel_moments

Split = Literal["train", "val", "test", "predict"]


def augmentation_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one batch's augmentation draws: reproducible from ``seed``, different on every rank and step.

    ``seed_everything`` gives every DDP rank the same global seed, so the rank must be mixed in explicitly.

    Example:
        >>> augmentation_seed(0, 0, 5) == augmentation_seed(0, 0, 5) != augmentation_seed(0, 1, 5)
        True
    """
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImageDataModule(pl.LightningDataModule):
    """Base class of traincraft's image DataModules.

    The loaders yield compact ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels. After Lightning moves a batch
    to the device, :meth:`on_after_batch_transfer` converts it to float in ``[0, 1]``, runs the augmentation module
    **only while training**, and normalizes every batch with per-channel mean and standard deviation computed
    from the training split (never hard-coded constants). The statistics are part of the DataModule's state, so
    they travel in checkpoints and validation, test and prediction after a restore use the training statistics.

    Augmentation draws are reproducible from ``seed`` and differ between DDP ranks and between batches: each batch
    runs under its own seed mixed from ``(seed, global rank, batch counter)``; the batch counter is Lightning's
    checkpointed loop progress, so a resumed run continues the stream.

    Subclasses implement :meth:`build_datasets` and the ``num_classes``, ``in_channels`` and ``image_size``
    properties, and may override :meth:`default_augment`.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: batch size for validation, test and prediction; defaults to ``batch_size``.
        num_workers: loader worker processes. In-memory data sets are fastest with 0.
        pin_memory: pin host memory for faster transfer; default: when CUDA is available.
        augment: ``"default"`` (the DataModule's own), ``"none"``, a preset name from
            :data:`traincraft.augment.PRESETS`, or any ``nn.Module`` mapping float images ``(N, C, H, W)`` in
            ``[0, 1]`` to images of the same shape (a kornia pipeline, for example).
        normalize: normalize with the training split's per-channel mean and standard deviation.
        seed: base seed of shuffling and augmentation; default: the seed given to ``seed_everything`` (or 0).
        drop_last: drop the last incomplete training batch (keeps batch statistics well defined).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        augment: Union[str, nn.Module, None] = "default",
        normalize: bool = True,
        seed: Optional[int] = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
        if isinstance(augment, str) and augment not in ("default", "none", *PRESETS):
            raise ValueError(
                f"unknown augment {augment!r}; choose 'default', 'none', one of the presets "
                f"{sorted(PRESETS)}, or pass an nn.Module (class_path in YAML)."
            )
        if augment is not None and not isinstance(augment, (str, nn.Module)):
            raise TypeError(f"augment must be a string or an nn.Module; got {type(augment).__name__}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augment = augment
        self.normalize = normalize
        self._seed = seed
        self.drop_last = drop_last
        self.datasets: dict[str, Dataset] = {}
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self._augment_module: Optional[nn.Module] = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------- for subclasses
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    def build_datasets(self) -> dict[str, Dataset]:
        """Return the splits (``"train"``, ``"val"``, ``"test"``, optionally ``"predict"``) as datasets of
        ``(uint8 image (C, H, W), int64 label)``; a :class:`TensorImageDataset` gives the fastest loaders."""
        raise NotImplementedError

    def default_augment(self) -> Optional[nn.Module]:
        """The augmentation used with ``augment="default"``; ``None`` for none."""
        return None

    # ----------------------------------------------------------------- setup
    @property
    def seed(self) -> int:
        if self._seed is not None:
            return self._seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            self.datasets = dict(self.build_datasets())
            if "train" not in self.datasets:
                raise ValueError(f"{type(self).__name__}.build_datasets must return a 'train' split; got {sorted(self.datasets)}.")
        if self.normalize and self.mean is None:
            self.mean, self.std = channel_moments(self._train_images())
            if bool((self.std <= 0).any()):
                raise ValueError(
                    f"a channel of the training images is constant (std={self.std.tolist()}); normalization would "
                    "divide by zero. Check the data or set normalize=False."
                )
        if self._augment_module is None:
            self._augment_module = self._resolve_augment()

    def _resolve_augment(self) -> Optional[nn.Module]:
        if isinstance(self.augment, nn.Module):
            return self.augment
        if self.augment == "default":
            return self.default_augment()
        if self.augment in (None, "none"):
            return None
        return PRESETS[self.augment]()

    def _train_images(self) -> Iterator[torch.Tensor]:
        dataset = self.datasets["train"]
        if isinstance(dataset, TensorImageDataset):
            yield from dataset.images.split(1024)
            return
        for batch in DataLoader(dataset, batch_size=256, num_workers=self.num_workers):
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    # ----------------------------------------------------------------- loaders
    def _loader(self, split: Split, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {split!r} split; it has {sorted(self.datasets)}.")
        dataset = self.datasets[split]
        batched = isinstance(dataset, TensorImageDataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffleSampler(dataset, seed=self.seed) if train else None,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_batched if batched else None,
            persistent_workers=self.num_workers > 0,
            # The loader's own generator: creating an iterator must not consume the global RNG, so resumed
            # runs see the same random stream (dropout, initialisation) as uninterrupted ones.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")

    # ----------------------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (tuple, list)):
            return type(batch)([self.transform(batch[0]), *batch[1:]])
        return self.transform(batch)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device -> float, augmented (training only), normalized."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{type(self).__name__} expects uint8 image batches of shape (N, C, H, W) from its loaders; got a "
                f"{images.dtype} tensor of shape {tuple(images.shape)}. Datasets must yield uint8 (C, H, W) images."
            )
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images with {self.in_channels} channels; got {images.shape[1]} (shape "
                f"{tuple(images.shape)})."
            )
        x = images.float().mul_(1.0 / 255.0)
        trainer = self.trainer
        if self._augment_module is not None and trainer is not None and trainer.training:
            with self._augmentation_stream(x.device, trainer):
                x = self._augment_module(x)
        if self.normalize:
            mean, std = self._statistics_on(x.device)
            x = (x - mean) / std
        return x

    @contextmanager
    def _augmentation_stream(self, device: torch.device, trainer: pl.Trainer) -> Iterator[None]:
        # Batches already drawn in this run (all epochs), restored with the loop state on resume.
        step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(augmentation_seed(self.seed, trainer.global_rank, step))
            yield

    def _statistics_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before batches are transformed.")
        if device not in self._on_device:  # copy once per device, not per step
            shape = (1, -1, 1, 1)
            self._on_device[device] = (self.mean.to(device).view(shape), self.std.to(device).view(shape))
        return self._on_device[device]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.mean is None:
            return {}
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        mean, std = torch.tensor(state_dict["mean"]), torch.tensor(state_dict["std"])
        if self.mean is not None and mean.shape != self.mean.shape:
            raise ValueError(
                f"the checkpoint's normalization statistics have {mean.numel()} channels but this data has "
                f"{self.mean.numel()}; the checkpoint comes from a different data set."
            )
        self.mean, self.std = mean, std
        self._on_device.clear()

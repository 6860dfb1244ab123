"""Base DataModule: uint8 batches from the loader, augmentation and normalization on the device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from traincraft.checkpoint import VerifiedLoading
from traincraft.data._interleave import ClassOrder
from traincraft.data._options import check_options
from traincraft.data._pipeline import (
    augmentation_seed,
    augmentation_stream,
    centre_crop,
    check_image_batch,
    eval_crop_size,
    fit_lighting,
    lighting_modules,
    model_input_size,
    resolve_augment,
)
from traincraft.data._sampler import EpochShuffleSampler
from traincraft.data._statistics_pass import (
    cache_path,
    compute_statistics,
    dataset_batches,
    tensor_fingerprint,
)
from traincraft.data._tensor_dataset import TensorImageDataset, collate_batched
from traincraft.data.class_interleaved_sampler import (
    ClassInterleavedSampler,
    check_interleavable,
    dataset_labels,
)
from traincraft.data.hard_example_sampler import HardExampleSampler
from traincraft.data.normalization import Normalization

__all__ = ["ImageDataModule", "augmentation_seed"]

Split = Literal["train", "val", "test", "predict"]


class ImageDataModule(VerifiedLoading, pl.LightningDataModule):
    """Base class of traincraft's image DataModules.

    The loaders yield compact ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels. After Lightning moves a batch
    to the device, :meth:`on_after_batch_transfer` converts it to float in ``[0, 1]``, runs the augmentation module
    **only while training**, and normalizes every batch with per-channel mean and standard deviation computed
    from the training split (never hard-coded constants), held by a :class:`~traincraft.data.Normalization`
    module (``normalization``; ``mean``, ``std`` and ``statistics`` read its buffers). The statistics are part of
    the DataModule's state, so they travel in checkpoints and validation, test and prediction after a restore use
    the training statistics.

    The statistics come from one streaming pass over the training split (float64 sums). Under DDP each rank sums
    its own share of the images and the sums are all-reduced, so every rank ends with the statistics of the whole
    split. With ``whitening`` the inputs are also decorrelated (PCA or ZCA), over the channels of each pixel or
    over whole images. With ``statistics_cache`` the result is stored on disk under a key computed from the training
    data and the options, and later runs on the same data load it instead of recomputing. The principal components
    of the pixel colours are handed to every :class:`~traincraft.augment.fancy_pca.FancyPCALighting` in the
    augmentation pipeline that has none.

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
        whitening: also decorrelate the inputs: ``"pca"`` (rotate onto the principal axes, unit variance each) or
            ``"zca"`` (the symmetric whitening, closest to the original images); replaces the per-channel scaling.
        whitening_scope: ``"image"`` whitens flattened images (``C·H·W`` at most 4096 features: CIFAR-sized, the
            classic ZCA) ; ``"channel"`` whitens the colour channels of every pixel (any size).
        whitening_epsilon: regularizer added to the covariance eigenvalues, as a fraction of their mean.
        statistics_cache: directory for cached statistics (keyed by a hash of the training data and the options).
        eval_crop: centre crop of validation, test and prediction images: ``"auto"`` crops to the size the
            training augmentation outputs when it differs from the stored size (the ``alexnet`` preset: 224 of 256),
            ``"none"`` keeps the whole image (for test-time averaging, which crops itself), or a size.
        seed: base seed of shuffling and augmentation; default: the seed given to ``seed_everything`` (or 0).
        drop_last: drop the last incomplete training batch (keeps batch statistics well defined).
        sampler: order of the training examples: ``"shuffle"`` (a uniform shuffle per epoch) or
            ``"class_interleaved"`` (:class:`~traincraft.data.ClassInterleavedSampler`: successive examples of
            different classes, sharded by class under DDP, resumable mid-epoch). With
            :class:`~traincraft.callbacks.HardExampleMining` the hard-example draw decides which examples an
            epoch visits and this option their order: ``"class_interleaved"`` orders each rank's draw by the same
            rule (the bound then holds for the drawn examples' class counts, repeats included).
        interleave_spacing: with ``sampler="class_interleaved"``: ``"stratified"`` (every class spread evenly
            over the epoch, so batches hold the classes in proportion) or ``"random"`` (a uniform shuffle, changed
            only where a neighbour would repeat a class).
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
        whitening: Optional[Literal["pca", "zca"]] = None,
        whitening_scope: Literal["channel", "image"] = "image",
        whitening_epsilon: float = 1e-2,
        statistics_cache: Optional[str] = None,
        eval_crop: Union[int, Literal["auto", "none"]] = "auto",
        sampler: Literal["shuffle", "class_interleaved"] = "shuffle",
        interleave_spacing: Literal["stratified", "random"] = "stratified",
    ) -> None:
        super().__init__()
        check_options(sampler=sampler, interleave_spacing=interleave_spacing, eval_crop=eval_crop, whitening=whitening,
                      whitening_scope=whitening_scope, normalize=normalize, whitening_epsilon=whitening_epsilon,
                      batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, augment=augment)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augment = augment
        self.normalize = normalize
        self._seed = seed
        self.drop_last = drop_last
        self.whitening, self.whitening_scope, self.whitening_epsilon = whitening, whitening_scope, whitening_epsilon
        self.statistics_cache = statistics_cache
        self.eval_crop = eval_crop
        self.sampler, self.interleave_spacing = sampler, interleave_spacing
        self._interleaved: Optional[ClassInterleavedSampler] = None  # the training loader's, while it has one
        self._sampler_resume: Optional[dict[str, int]] = None  # a checkpoint's position, for the next loader
        self._eval_size: Optional[int] = None
        self.datasets: dict[str, Dataset] = {}
        self.normalization = Normalization(whitening, whitening_scope)
        self._augment_module: Optional[nn.Module] = None

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """Per-channel mean of the training images (``None`` before ``setup``)."""
        return self.normalization.mean

    @property
    def std(self) -> Optional[torch.Tensor]:
        """Per-channel standard deviation of the training images (``None`` before ``setup``)."""
        return self.normalization.std

    @property
    def statistics(self) -> dict[str, torch.Tensor]:
        """The other statistics: image count, whitening transform, principal components of the pixel colours."""
        return self.normalization.statistics

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

    @property
    def model_input_size(self) -> int:
        """Side of the images the model receives: ``image_size``, or the output of a crop in the augmentation
        (``ScaleJitterCrop``, ``RandomCrop``), or ``eval_crop`` when it is a size. ``traincraft fit`` links it into
        the model's ``input_size``. A crop inside a foreign augmentation module is not seen: set ``input_size``."""
        if self._augment_module is None:
            self._augment_module = resolve_augment(self.augment, self.default_augment)
        return model_input_size(self.eval_crop, self._augment_module, self.image_size)

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
        return self._seed if self._seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            self.datasets = dict(self.build_datasets())
            if "train" not in self.datasets:
                raise ValueError(f"{type(self).__name__}.build_datasets must return a 'train' split; got {sorted(self.datasets)}.")
            if self.sampler == "class_interleaved":  # refuse a training set it cannot order now, not at fit
                check_interleavable(self.datasets["train"], type(self).__name__)
        if self._augment_module is None:
            self._augment_module = resolve_augment(self.augment, self.default_augment)
        if (self.normalize or lighting_modules(self._augment_module)) and self.mean is None:
            self.normalization.set_statistics(self._compute_statistics())
            if bool((self.std <= 0).any()):
                raise ValueError(
                    f"a channel of the training images is constant (std={self.std.tolist()}); normalization would "
                    "divide by zero. Check the data or set normalize=False."
                )
        fit_lighting(self._augment_module, self.statistics, type(self).__name__, self.in_channels)
        self._eval_size = eval_crop_size(self.eval_crop, self._augment_module, self.in_channels, self.image_size)

    # ----------------------------------------------------------------- statistics
    def data_fingerprint(self) -> Optional[str]:
        """A hash identifying the training images (keys the statistics cache); ``None`` when it cannot be
        computed cheaply, which disables caching. Datasets may provide their own ``fingerprint()``."""
        dataset = self.datasets["train"]
        if hasattr(dataset, "fingerprint"):
            return dataset.fingerprint()
        if isinstance(dataset, TensorImageDataset):
            return tensor_fingerprint(dataset.images)
        return None

    def _compute_statistics(self) -> dict[str, torch.Tensor]:
        fingerprint = self.data_fingerprint() if self.statistics_cache is not None else None
        options = {"whitening": self.whitening, "scope": self.whitening_scope if self.whitening else None,
                   "epsilon": self.whitening_epsilon if self.whitening else None}
        path = cache_path(self.statistics_cache, fingerprint, options)
        return compute_statistics(self._train_images, self.whitening, self.whitening_scope, self.whitening_epsilon,
                                  path)

    def _train_images(self, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """The training images of this rank's share, in uint8 batches (the statistics pass reads them)."""
        return dataset_batches(self.datasets["train"], rank, world, self.num_workers, self.collate_fn("train"))

    # ----------------------------------------------------------------- training sampler hook
    _train_sampler: Optional[Sampler] = None

    def set_train_sampler(self, sampler: Optional[Sampler]) -> None:
        """Draw training batches with ``sampler`` instead of the default :class:`EpochShuffleSampler`; ``None``
        restores the default. :class:`~traincraft.callbacks.HardExampleMining` sets its sampler here; with
        ``sampler="class_interleaved"`` a :class:`HardExampleSampler`'s draws are ordered by class."""
        if isinstance(sampler, HardExampleSampler):
            sampler.reorder = ClassOrder(dataset_labels(self.datasets["train"]), self.seed, self.interleave_spacing) \
                if self.sampler == "class_interleaved" else None
        self._train_sampler = sampler

    def _default_train_sampler(self, dataset: Dataset) -> Sampler:
        if self.sampler == "shuffle":
            return EpochShuffleSampler(dataset, seed=self.seed)
        trainer = self.trainer
        # Lightning's placement of this process (the data dimension only under column parallelism)
        placement = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ClassInterleavedSampler(dataset_labels(dataset), placement.get("num_replicas", 1),
                                          placement.get("rank", 0), seed=self.seed, spacing=self.interleave_spacing)
        if self._sampler_resume is not None:
            sampler.load_state_dict(self._sampler_resume)
            self._sampler_resume = None
        self._interleaved = sampler
        return sampler

    # ----------------------------------------------------------------- loaders
    def _loader(self, split: Split, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {split!r} split; it has {sorted(self.datasets)}.")
        dataset = self.datasets[split]
        sampler = None
        if train:
            sampler = self._train_sampler if self._train_sampler is not None else self._default_train_sampler(dataset)
        return DataLoader(
            dataset, batch_size=self.batch_size if train else self.eval_batch_size, sampler=sampler,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory, collate_fn=self.collate_fn(split), persistent_workers=self.num_workers > 0,
            # The loader's own generator: creating an iterator must not consume the global RNG, so resumed
            # runs see the same random stream (dropout, initialisation) as uninterrupted ones.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def collate_fn(self, split: str) -> Any:
        """The loader's collate function for ``split``; ``None`` is PyTorch's default."""
        return collate_batched if isinstance(self.datasets.get(split), TensorImageDataset) else None

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
        check_image_batch(images, self.in_channels, type(self).__name__)
        x = images.float().mul_(1.0 / 255.0)
        trainer = self.trainer
        if self._augment_module is not None and trainer is not None and trainer.training:
            with self._augmentation_stream(x.device, trainer):
                x = self._augment_module(x)
        elif self._eval_size is not None:
            x = centre_crop(x, self._eval_size)
        if self.normalize:
            x = self.normalize_batch(x)
        return x

    def normalize_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in ``[0, 1]`` -> normalized (or whitened) with the training statistics."""
        if not self.normalization.fitted:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before batches are transformed.")
        if self.normalization.mean.device != x.device:  # moved once per device, not per step
            self.normalization.to(x.device)
        return self.normalization(x)

    def _augmentation_stream(self, device: torch.device, trainer: pl.Trainer) -> AbstractContextManager[None]:
        return augmentation_stream(self.seed, device, trainer)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.normalization.checkpoint_state()
        trainer = self.trainer
        if self._interleaved is not None and trainer is not None and trainer.state.fn == "fit":
            # Lightning's count of this epoch's processed batches, not the sampler's: the loader prefetches
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["class_interleaved"] = self._interleaved.state_after(batches, self.batch_size,
                                                                       trainer.num_training_batches)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "class_interleaved" in state_dict:
            state_dict = dict(state_dict)
            self._sampler_resume = state_dict.pop("class_interleaved")
        if "mean" not in state_dict:
            return
        self.normalization.load_checkpoint_state(state_dict, type(self).__name__)
        if self._augment_module is not None and self.statistics.get("pixel_eigenvalues") is not None:
            fit_lighting(self._augment_module, self.statistics, type(self).__name__, self.in_channels, force=True)

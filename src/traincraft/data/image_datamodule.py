"""Base DataModule: uint8 batches from the loader, augmentation and normalization on the device."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from traincraft.augment import PRESETS
from traincraft.augment.crop import RandomCrop
from traincraft.augment.fancy_pca import FancyPCALighting
from traincraft.augment.scale_jitter import ScaleJitterCrop
from traincraft.data._interleave import SPACINGS, interleave_order, seeded_generator
from traincraft.data._sampler import EpochShuffleSampler
from traincraft.data._tensor_dataset import TensorImageDataset, collate_batched
from traincraft.data.class_interleaved_sampler import ClassInterleavedSampler, dataset_labels
from traincraft.data.hard_example_sampler import HardExampleSampler
from traincraft.data.statistics import moment_sums, statistics_from_sums

_STAT_KEYS = ("count", "whitening_mean", "whitening_matrix", "pixel_eigenvalues", "pixel_eigenvectors")

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
        if sampler not in ("shuffle", "class_interleaved"):
            raise ValueError(f"sampler must be 'shuffle' or 'class_interleaved'; got {sampler!r}.")
        if interleave_spacing not in SPACINGS:
            raise ValueError(f"interleave_spacing must be one of {SPACINGS}; got {interleave_spacing!r}.")
        if eval_crop not in ("auto", "none") and (not isinstance(eval_crop, int) or eval_crop <= 0):
            raise ValueError(f"eval_crop must be 'auto', 'none' or a positive size; got {eval_crop!r}.")
        if whitening not in (None, "pca", "zca"):
            raise ValueError(f"whitening must be None, 'pca' or 'zca'; got {whitening!r}.")
        if whitening_scope not in ("channel", "image"):
            raise ValueError(f"whitening_scope must be 'channel' or 'image'; got {whitening_scope!r}.")
        if whitening is not None and not normalize:
            raise ValueError("whitening is a kind of normalization; set normalize=True (or whitening=None).")
        if whitening_epsilon < 0:
            raise ValueError(f"whitening_epsilon must be >= 0; got {whitening_epsilon}.")
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
        self.whitening, self.whitening_scope, self.whitening_epsilon = whitening, whitening_scope, whitening_epsilon
        self.statistics_cache = statistics_cache
        self.eval_crop = eval_crop
        self.sampler, self.interleave_spacing = sampler, interleave_spacing
        self._interleaved: Optional[ClassInterleavedSampler] = None  # the training loader's, while it has one
        self._sampler_resume: Optional[dict[str, int]] = None  # a checkpoint's position, for the next loader
        self._eval_size: Optional[int] = None
        self.datasets: dict[str, Dataset] = {}
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self.statistics: dict[str, torch.Tensor] = {}  # whitening transform, pixel principal components
        self._augment_module: Optional[nn.Module] = None
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

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
        if isinstance(self.eval_crop, int) and not isinstance(self.eval_crop, bool):
            return int(self.eval_crop)
        if self._augment_module is None:
            self._augment_module = self._resolve_augment()
        size = self.image_size
        for module in self._augment_module.modules() if self._augment_module is not None else ():
            if isinstance(module, ScaleJitterCrop):
                size = module.size
            elif isinstance(module, RandomCrop):
                height, width = module.size
                if height != width:
                    raise ValueError(f"the models take square images; the augmentation crops to {height}x{width}.")
                size = width
        return size

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
            if self.sampler == "class_interleaved":
                if isinstance(self.datasets["train"], IterableDataset):
                    raise ValueError(
                        f"sampler='class_interleaved' orders a map-style training set, but {type(self).__name__} "
                        "streams an iterable one (its order comes from the stream); use sampler='shuffle'."
                    )
                dataset_labels(self.datasets["train"])  # refuse a training set without labels now, not at fit
        if self._augment_module is None:
            self._augment_module = self._resolve_augment()
        if (self.normalize or self._lighting_modules()) and self.mean is None:
            self._set_statistics(self._compute_statistics())
            if bool((self.std <= 0).any()):
                raise ValueError(
                    f"a channel of the training images is constant (std={self.std.tolist()}); normalization would "
                    "divide by zero. Check the data or set normalize=False."
                )
        self._fit_lighting()
        self._eval_size = self._resolve_eval_crop()

    def _resolve_eval_crop(self) -> Optional[int]:
        if self.eval_crop == "none":
            return None
        if self.eval_crop != "auto":
            return int(self.eval_crop)
        if self._augment_module is None:
            return None
        size = self.image_size
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # a probe: leaves the global stream untouched
            out = self._augment_module(torch.full((1, self.in_channels, size, size), 0.5))
        return None if tuple(out.shape[-2:]) == (size, size) else int(out.shape[-1])

    # ----------------------------------------------------------------- statistics
    def _lighting_modules(self) -> list[FancyPCALighting]:
        if self._augment_module is None:
            return []
        return [m for m in self._augment_module.modules() if isinstance(m, FancyPCALighting)]

    def _fit_lighting(self, force: bool = False) -> None:
        for module in self._lighting_modules():
            if module.fitted and not force:
                continue
            if "pixel_eigenvalues" not in self.statistics or self.statistics["pixel_eigenvalues"].numel() != 3:
                raise ValueError(
                    f"FancyPCALighting needs RGB training images; {type(self).__name__} has {self.in_channels} "
                    "channel(s). Remove it from the augmentation pipeline."
                )
            module.set_principal_components(self.statistics["pixel_eigenvalues"], self.statistics["pixel_eigenvectors"])

    def _statistics_options(self) -> dict[str, Any]:
        return {"whitening": self.whitening, "scope": self.whitening_scope if self.whitening else None,
                "epsilon": self.whitening_epsilon if self.whitening else None}

    def data_fingerprint(self) -> Optional[str]:
        """A hash identifying the training images (keys the statistics cache); ``None`` when it cannot be
        computed cheaply, which disables caching. Datasets may provide their own ``fingerprint()``."""
        dataset = self.datasets["train"]
        if hasattr(dataset, "fingerprint"):
            return dataset.fingerprint()
        if isinstance(dataset, TensorImageDataset):
            digest = hashlib.sha256(str(tuple(dataset.images.shape)).encode())
            digest.update(dataset.images.contiguous().numpy().tobytes())
            return digest.hexdigest()
        return None

    def _cache_path(self) -> Optional[str]:
        if self.statistics_cache is None:
            return None
        fingerprint = self.data_fingerprint()
        if fingerprint is None:
            return None
        key = hashlib.sha256(f"{fingerprint}|{sorted(self._statistics_options().items())}".encode()).hexdigest()[:32]
        return os.path.join(self.statistics_cache, f"statistics-{key}.pt")

    def _compute_statistics(self) -> dict[str, torch.Tensor]:
        path = self._cache_path()
        if path is not None and os.path.exists(path):
            return torch.load(path, weights_only=True)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        sums = moment_sums(
            self._train_images(rank, world), feature_covariance=self.whitening is not None and self.whitening_scope == "image"
        )
        if distributed:
            # each rank summed its own share; the sums add up to those of the whole split
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            for key in sorted(sums):
                total = sums[key].to(device)
                dist.all_reduce(total)
                sums[key] = total.cpu()
        stats = statistics_from_sums(sums, self.whitening, self.whitening_epsilon)
        if path is not None and rank == 0:
            os.makedirs(self.statistics_cache, exist_ok=True)
            torch.save(stats, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a concurrent reader never sees half a file
        return stats

    def _set_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        self.mean, self.std = stats["mean"], stats["std"]
        self.statistics = {k: stats[k] for k in _STAT_KEYS if k in stats}
        self._on_device.clear()

    def _resolve_augment(self) -> Optional[nn.Module]:
        if isinstance(self.augment, nn.Module):
            return self.augment
        if self.augment == "default":
            return self.default_augment()
        if self.augment in (None, "none"):
            return None
        return PRESETS[self.augment]()

    def _train_images(self, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        dataset = self.datasets["train"]
        if isinstance(dataset, TensorImageDataset):
            yield from dataset.images[rank::world].split(1024)
            return
        if world > 1:
            dataset = Subset(dataset, range(rank, len(dataset), world))
        for batch in DataLoader(dataset, batch_size=256, num_workers=self.num_workers, collate_fn=self.collate_fn("train")):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if images.shape[0]:  # a batch whose files were all skipped as unreadable is empty
                yield images

    # ----------------------------------------------------------------- training sampler hook
    _train_sampler: Optional[Sampler] = None

    def set_train_sampler(self, sampler: Optional[Sampler]) -> None:
        """Draw training batches with ``sampler`` instead of the default :class:`EpochShuffleSampler`; ``None``
        restores the default. :class:`~traincraft.callbacks.HardExampleMining` sets its sampler here; with
        ``sampler="class_interleaved"`` a :class:`HardExampleSampler`'s draws are ordered by class."""
        if isinstance(sampler, HardExampleSampler):
            sampler.reorder = _ClassOrder(dataset_labels(self.datasets["train"]), self.seed, self.interleave_spacing) \
                if self.sampler == "class_interleaved" else None
        self._train_sampler = sampler

    def _default_train_sampler(self, dataset: Dataset) -> Sampler:
        if self.sampler == "shuffle":
            return EpochShuffleSampler(dataset, seed=self.seed)
        trainer = self.trainer
        # Lightning's placement of this process (the data dimension only under column parallelism)
        placement = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ClassInterleavedSampler(
            dataset_labels(dataset), num_replicas=placement.get("num_replicas", 1), rank=placement.get("rank", 0),
            seed=self.seed, spacing=self.interleave_spacing,
        )
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
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collate_fn(split),
            persistent_workers=self.num_workers > 0,
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
        elif self._eval_size is not None:
            c = self._eval_size
            top, left = (x.shape[-2] - c) // 2, (x.shape[-1] - c) // 2
            if top < 0 or left < 0:
                raise ValueError(f"eval_crop={c} is larger than the {x.shape[-2]}x{x.shape[-1]} images; lower it.")
            x = x[..., top : top + c, left : left + c]
        if self.normalize:
            x = self.normalize_batch(x)
        return x

    def normalize_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in ``[0, 1]`` -> normalized (or whitened) with the training statistics."""
        stats = self._statistics_on(x.device)
        if self.whitening is None:
            return (x - stats["mean"]) / stats["std"]
        if self.whitening_scope == "channel":  # a 1x1 convolution: W (x - μ) for every pixel
            return F.conv2d(x, stats["weight"], stats["bias"])
        if x[0].numel() != stats["bias"].numel():
            raise ValueError(
                f"image-level whitening was computed for images of {stats['bias'].numel()} values but got "
                f"{tuple(x.shape[1:])}; augmentation and eval_crop must keep the stored size, or use "
                "whitening_scope='channel'."
            )
        return torch.addmm(stats["bias"], x.flatten(1), stats["weight"]).view_as(x)

    @staticmethod
    def _data_rank(trainer: pl.Trainer) -> int:
        # Ranks that hold different parts of one model replica (column parallelism) read the same batch and must
        # augment it identically: such strategies expose the replica's index as `data_parallel_rank`.
        return getattr(getattr(trainer, "strategy", None), "data_parallel_rank", trainer.global_rank)

    @contextmanager
    def _augmentation_stream(self, device: torch.device, trainer: pl.Trainer) -> Iterator[None]:
        # Batches already drawn in this run (all epochs), restored with the loop state on resume.
        step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(augmentation_seed(self.seed, self._data_rank(trainer), step))
            yield

    def _statistics_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before batches are transformed.")
        if device not in self._on_device:  # copy once per device, not per step
            shape = (1, -1, 1, 1)
            moved = {"mean": self.mean.to(device).view(shape), "std": self.std.to(device).view(shape)}
            if self.whitening is not None:
                matrix, centre = self.statistics["whitening_matrix"], self.statistics["whitening_mean"]
                if self.whitening_scope == "channel":
                    moved["weight"] = matrix[:, :, None, None].to(device)
                    moved["bias"] = (-(matrix @ centre)).to(device)
                else:
                    moved["weight"] = matrix.T.contiguous().to(device)
                    moved["bias"] = (-(matrix @ centre)).to(device)
            self._on_device[device] = moved
        return self._on_device[device]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.mean is not None:
            state = {"mean": self.mean.tolist(), "std": self.std.tolist(), **self.statistics}
        trainer = self.trainer
        if self._interleaved is not None and trainer is not None and trainer.state.fn == "fit":
            # Lightning's count of this epoch's processed batches, not the sampler's: the loader prefetches
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler_state = self._interleaved.state_dict(position=batches * self.batch_size)
            if batches >= trainer.num_training_batches:  # saved at the epoch's end (drop_last may leave a tail)
                sampler_state = {"epoch": sampler_state["epoch"] + 1, "position": 0}
            state["class_interleaved"] = sampler_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "class_interleaved" in state_dict:
            state_dict = dict(state_dict)
            self._sampler_resume = state_dict.pop("class_interleaved")
        if "mean" not in state_dict:
            return
        mean, std = torch.tensor(state_dict["mean"]), torch.tensor(state_dict["std"])
        if self.mean is not None and mean.shape != self.mean.shape:
            raise ValueError(
                f"the checkpoint's normalization statistics have {mean.numel()} channels but this data has "
                f"{self.mean.numel()}; the checkpoint comes from a different data set."
            )
        if self.whitening is not None and "whitening_matrix" not in state_dict:
            raise ValueError(
                f"this {type(self).__name__} whitens its inputs (whitening={self.whitening!r}) but the checkpoint has "
                "no whitening statistics; it was trained without whitening. Set whitening=None to use it."
            )
        self._set_statistics({"mean": mean, "std": std, **{k: state_dict[k] for k in _STAT_KEYS if k in state_dict}})
        if self._augment_module is not None and self.statistics.get("pixel_eigenvalues") is not None:
            self._fit_lighting(force=True)


class _ClassOrder:
    """Orders one rank's hard-example draw by class (:func:`interleave_order`), reproducibly per (epoch, rank)."""

    def __init__(self, labels: torch.Tensor, seed: int, spacing: str) -> None:
        self.labels, self.seed, self.spacing = labels, seed, spacing

    def __call__(self, indices: torch.Tensor, epoch: int, rank: int) -> torch.Tensor:
        return indices[interleave_order(self.labels[indices], self.spacing, seeded_generator(self.seed, epoch, rank, 7))]

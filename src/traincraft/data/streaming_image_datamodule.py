"""The streaming reader: images optimized by :func:`~traincraft.data.optimize_image_folder`, streamed back with
LitData with shuffling, DDP sharding and a resumable position."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from traincraft.data._litdata import FORMAT, METADATA_FILE, is_remote, not_optimized, require_litdata
from traincraft.data.image_datamodule import ImageDataModule


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """litdata items -> the ``(uint8 images (N, C, H, W), int64 labels (N,))`` batches of every ImageDataModule."""
    return torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items], dtype=torch.int64)


@functools.cache
def _resumable_loader() -> type:
    """``litdata.StreamingDataLoader`` whose resumed epoch also ends when Lightning stops at the loader's length.

    litdata clears its "resuming" flag only when the iterator is exhausted; Lightning stops iterating once it has
    fetched ``len(loader)`` batches, so after a mid-epoch resume the next epoch would replay the resumed one from the
    checkpointed position (litdata issues #770, #775). Here a new iterator over an already-used restored state starts
    the next epoch instead. Defined on first use: litdata is imported lazily."""
    ld = require_litdata()

    class ResumableStreamingDataLoader(ld.StreamingDataLoader):
        _unused_restore = False  # a loaded state that no iterator has consumed yet

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._unused_restore = self.restore

        def __iter__(self) -> Iterator[Any]:
            if self.restore and not self._unused_restore:  # the restored epoch was streamed: begin the next one
                self.restore = False
            self._unused_restore = False
            yield from super().__iter__()

    return ResumableStreamingDataLoader


@contextmanager
def _quiet_litdata_warning() -> Iterator[None]:
    # litdata logs a warning for drop_last=False under DDP (ranks could get different batch counts); the statistics
    # pass wants exactly that: every image once, and it runs no collective per batch.
    log = logging.getLogger("litdata.streaming.dataset")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class StreamingImageDataModule(ImageDataModule):
    """Images optimized by :func:`~traincraft.data.optimize_image_folder`, streamed with LitData from a local
    directory or object storage: for data sets larger than one machine's disk or memory.

    ``train_dir`` (and ``val_dir``, ``test_dir``) is a local directory (read in place), ``local:/path`` (a local
    directory treated as a remote: chunks are copied into ``cache_dir`` and read from there) or a URL
    (``s3://``, ``gs://``, ``r2://``, ``azure://``). The training loader is a ``litdata.StreamingDataLoader``:

    - **shuffling**: the chunk order and the order inside each chunk are drawn from ``(seed, epoch)``, so each epoch
      has its own order, reproducible from the seed;
    - **DDP**: litdata splits the chunks between the ranks itself (Lightning adds no ``DistributedSampler`` to an
      iterable data set). Every rank gets ``⌊N / (batch_size·world_size)⌋`` full batches of distinct images; the
      remaining ``N mod (batch_size·world_size)`` images of the epoch are dropped (litdata forces ``drop_last``
      under DDP so that no rank waits in a gradient all-reduce). Evaluation splits are sharded the same way under
      DDP; evaluate on one device to see every image;
    - **resuming**: the loader's position is part of :meth:`state_dict` (with the normalization statistics), which
      Lightning stores in checkpoints; a run resumed from a mid-epoch checkpoint continues the stream with the next
      batch, and the next epoch's order is the one the uninterrupted run would have used.

    Batches are ``(uint8 images (N, C, H, W), int64 labels)``: augmentation and normalization run on the device as in
    every :class:`ImageDataModule`. ``num_classes``, ``in_channels`` and ``image_size`` come from the optimized
    data's ``traincraft.json``; the statistics pass streams the training split once (under DDP each rank its shard,
    then all-reduced), and the statistics cache is keyed by litdata's ``index.json``.

    Args:
        train_dir: the optimized training split (``output_dir/train`` of
            :func:`~traincraft.data.optimize_image_folder`).
        val_dir: the optimized validation split; ``None`` trains without validation.
        test_dir: the optimized test split.
        cache_dir: where chunks of remote (and ``local:``) data are cached; default: litdata's cache directory.
        shuffle: shuffle the training stream (chunks and images) every epoch.
        max_cache_size: cache budget of litdata, e.g. ``"200GB"``; default: litdata's (most of the free disk).
        storage_options: passed to litdata's object-store client (credentials, ``endpoint_url``, ...).
        **kwargs: loader, augmentation and normalization options of :class:`ImageDataModule` (``batch_size``,
            ``num_workers``, ``seed``, ``augment``, ...).

    Example:
        >>> dm = StreamingImageDataModule("s3://bucket/imagenet-256/train", val_dir="s3://bucket/imagenet-256/val",
        ...                               cache_dir="/local/nvme/cache", batch_size=256, num_workers=8)
        >>> dm.shuffle, dm.batch_size  # nothing is read until the properties or setup() need it
        (True, 256)
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: Optional[str] = None,
        test_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        shuffle: bool = True,
        max_cache_size: Optional[str] = None,
        storage_options: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_litdata()
        for name, value in (("train_dir", train_dir), ("val_dir", val_dir), ("test_dir", test_dir),
                            ("cache_dir", cache_dir)):
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise ValueError(f"{name} must be a non-empty path or URL; got {value!r}.")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be True or False; got {shuffle!r}.")
        self.dirs = {name: str(d) for name, d in (("train", train_dir), ("val", val_dir), ("test", test_dir)) if d}
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.shuffle = shuffle
        self.max_cache_size = max_cache_size
        self.storage_options = storage_options
        self._metadata: dict[str, dict[str, Any]] = {}
        self._train_loader: Optional[Any] = None
        self._pending_loader_state: Optional[dict[str, Any]] = None

    # ----------------------------------------------------------------- metadata
    def metadata(self, split: str = "train") -> dict[str, Any]:
        """The ``traincraft.json`` of a split: classes, image size, channels, image count, skipped files."""
        if split not in self._metadata:
            if split not in self.dirs:
                raise ValueError(f"{type(self).__name__} has no {split!r} split; it has {sorted(self.dirs)}.")
            self._metadata[split] = self._read_metadata(self.dirs[split])
        return self._metadata[split]

    def _read_metadata(self, location: str) -> dict[str, Any]:
        if is_remote(location):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, METADATA_FILE)
                try:
                    get_downloader(location, tmp, [], self.storage_options).download_file(
                        f"{location.rstrip('/')}/{METADATA_FILE}", local
                    )
                    text = Path(local).read_text()
                except Exception as error:  # each object store raises its own "not found"
                    raise not_optimized(location, f"cannot read {METADATA_FILE} ({error})") from error
        else:
            folder = Path(location)
            if not folder.is_dir():
                raise not_optimized(location, "no such directory")
            if not (folder / "index.json").is_file():
                raise not_optimized(location, "it has no litdata index.json")
            if not (folder / METADATA_FILE).is_file():
                raise not_optimized(location, f"it is a litdata data set without {METADATA_FILE} (class names, "
                                               "image size)")
            text = (folder / METADATA_FILE).read_text()
        metadata = json.loads(text)
        if metadata.get("format") != FORMAT:
            raise not_optimized(location, f"its {METADATA_FILE} has format {metadata.get('format')!r}")
        return metadata

    @property
    def classes(self) -> list[str]:
        return list(self.metadata("train")["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.metadata("train")["channels"])

    @property
    def image_size(self) -> int:
        return int(self.metadata("train")["image_size"])

    @property
    def skipped_files(self) -> int:
        """Unreadable files skipped when the splits were optimized."""
        return sum(int(self.metadata(split)["skipped"]) for split in self.dirs)

    def default_augment(self) -> Optional[torch.nn.Module]:
        from traincraft.augment.presets import alexnet

        if self.in_channels == 3 and self.image_size >= 256:  # as ImageFolderDataModule: the ImageNet recipe
            return alexnet(size=224 * self.image_size // 256)
        return None

    # ----------------------------------------------------------------- data sets
    def _streaming_dataset(self, split: str, shuffle: bool, drop_last: Optional[bool]) -> Any:
        ld = require_litdata()
        return ld.StreamingDataset(
            self.dirs[split], cache_dir=self.cache_dir, shuffle=shuffle, drop_last=drop_last, seed=self.seed,
            max_cache_size=self.max_cache_size, storage_options=self.storage_options,
            # Items are raw tensors read one by one (nothing to decode in windows), so a full in-chunk permutation
            # costs nothing and shuffles better than litdata's default blocks of 256.
            batch_decode=0, item_shuffle_window=0,
        )

    def build_datasets(self) -> dict[str, Any]:
        train = self.metadata("train")
        for split in self.dirs:
            other = self.metadata(split)
            for key in ("classes", "image_size", "channels"):
                if other[key] != train[key]:
                    raise ValueError(
                        f"the {split!r} split ({self.dirs[split]}) has {key}={other[key]!r} but the training split has "
                        f"{train[key]!r}; optimize both from the same folder with the same image_size and channels."
                    )
        # Under DDP litdata forces drop_last (equal batch counts on every rank); alone, follow `drop_last` as the
        # base class does (keep a data set smaller than one batch).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        drop_last = None if distributed else self.drop_last and train["num_images"] > self.batch_size
        datasets = {"train": self._streaming_dataset("train", self.shuffle, drop_last)}
        for split in ("val", "test"):
            if split in self.dirs:
                datasets[split] = self._streaming_dataset(split, False, None)
        return datasets

    def data_fingerprint(self) -> Optional[str]:
        """Hash of the training split's litdata ``index.json`` (chunk names, sizes, write time) and metadata: cheap,
        and it changes when the data are optimized again."""
        index = Path(self.datasets["train"].input_dir.path, "index.json").read_bytes()  # a local copy, also of remote data
        digest = hashlib.sha256(index)
        digest.update(json.dumps(self.metadata("train"), sort_keys=True).encode())
        return digest.hexdigest()

    def _train_images(self, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        ld = require_litdata()
        with _quiet_litdata_warning():  # its own data set: the training stream keeps its position
            dataset = self._streaming_dataset("train", shuffle=False, drop_last=False)
        if dataset.distributed_env.world_size != world or dataset.distributed_env.global_rank != rank:
            raise RuntimeError(
                f"litdata sees rank {dataset.distributed_env.global_rank} of {dataset.distributed_env.world_size} but "
                f"torch.distributed rank {rank} of {world}; check the WORLD_SIZE and GLOBAL_RANK environment variables."
            )
        # litdata hands out whole batches (the remainder to the last rank): batches small enough that every rank
        # gets at least one, and without drop_last the last rank also reads the remainder, so every image is read once
        batch_size = max(1, min(256, self.metadata("train")["num_images"] // world))
        loader = ld.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=_collate)
        for images, _ in loader:
            yield images

    # ----------------------------------------------------------------- loaders
    def collate_fn(self, split: str) -> Any:
        return _collate

    def train_dataloader(self) -> Any:
        """The training ``StreamingDataLoader``: created once, so its epoch counter and position persist."""
        if self._train_loader is None:
            self._train_loader = _resumable_loader()(
                self.datasets["train"], batch_size=self.batch_size, num_workers=self.num_workers,
                pin_memory=self.pin_memory, collate_fn=_collate,
            )
            if self._pending_loader_state is not None:
                self._train_loader.load_state_dict(self._pending_loader_state)
                self._pending_loader_state = None
        return self._train_loader

    def set_train_sampler(self, sampler: Optional[Any]) -> None:
        """Refused: a stream has no index to sample from (``HardExampleMining`` needs a map-style DataModule)."""
        if sampler is not None:
            raise ValueError(
                f"{type(self).__name__} streams its training data with litdata (an iterable data set) and cannot draw "
                f"batches with a sampler ({type(sampler).__name__}); use an in-memory or image-folder DataModule."
            )

    def _eval_loader(self, split: str) -> Any:
        ld = require_litdata()
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {split!r} split: set {split}_dir.")
        return ld.StreamingDataLoader(self.datasets[split], batch_size=self.eval_batch_size,
                                      num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=_collate)

    def val_dataloader(self) -> Any:
        return self._eval_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")

    def predict_dataloader(self) -> Any:
        return self._eval_loader("test")

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The normalization statistics and the training loader's position (``train_loader``)."""
        state = super().state_dict()
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "train_loader"})
        loader_state = state_dict.get("train_loader")
        if loader_state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(loader_state)
        else:  # Lightning restores the DataModule before it asks for the loaders
            self._pending_loader_state = loader_state

"""Data sets larger than one machine: image folders optimized into LitData chunks, streamed back with shuffling,
DDP sharding and a resumable position."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from traincraft.data.image_datamodule import ImageDataModule
from traincraft.data.image_folder import ImageFolderDataModule, ImageFolderDataset

METADATA_FILE = "traincraft.json"
_FORMAT = "traincraft-image-folder"
_INSTALL = (
    "`pip install litdata` (where no torchvision build matches the installed torch, "
    "`pip install --no-deps litdata` and then its other requirements: "
    "`pip install boto3 filelock obstore requests tifffile urllib3`)"
)
_REMOTE_PREFIXES = ("local:", "s3://", "gs://", "r2://", "azure://", "hf://")


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as error:  # litdata is an optional dependency: `import traincraft.data` must work without it
        raise ModuleNotFoundError(f"streaming data sets need the litdata package; install it with {_INSTALL}.") from error
    return litdata


def _is_remote(location: str) -> bool:
    return location.startswith(_REMOTE_PREFIXES)


def _not_optimized(location: str, why: str) -> ValueError:
    return ValueError(
        f"{location} is not a data set written by optimize_image_folder: {why}. Create it with "
        "`traincraft.data.optimize_image_folder(root, output_dir)`, which writes output_dir/train (and val, test) "
        "holding litdata's index.json, the chunks and traincraft.json; then pass output_dir/train as train_dir."
    )


class _EncodeImage:
    """litdata's per-item function: decode and resize one file (ImageFolderDataset's reader) in a litdata worker.

    Workers are separate processes: skipped files and decoding errors are written to ``log_dir`` so that the
    calling process can report them by path."""

    def __init__(self, dataset: ImageFolderDataset, log_dir: str) -> None:
        self.dataset, self.log_dir = dataset, log_dir

    def __call__(self, index: int) -> Optional[dict[str, Any]]:
        try:
            item = self.dataset[index]
        except ValueError as error:
            with open(os.path.join(self.log_dir, f"{os.getpid()}.error"), "a") as log:
                log.write(f"{error}\n")
            raise
        if item is None:  # on_error="skip": the reader warned; litdata writes nothing for None
            with open(os.path.join(self.log_dir, f"{os.getpid()}.skipped"), "a") as log:
                log.write(f"{self.dataset.samples[index][0]}\n")
            return None
        image, label = item
        return {"image": image, "label": int(label)}


def _read_logs(log_dir: str, suffix: str) -> list[str]:
    lines: list[str] = []
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(suffix):
            lines.extend(Path(log_dir, name).read_text().splitlines())
    return lines


def optimize_image_folder(
    root: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    image_size: int = 256,
    channels: Literal[1, 3] = 3,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    num_workers: Optional[int] = None,
    chunk_bytes: Union[int, str] = "64MB",
    overwrite: bool = False,
    start_method: Optional[Literal["fork", "spawn", "forkserver"]] = None,
    verbose: bool = True,
) -> dict[str, str]:
    """Write an image folder as LitData chunks for :class:`StreamingImageDataModule`.

    The folder is read exactly as :class:`~traincraft.data.ImageFolderDataModule` reads it: ``root/train/<class>/``
    (classes are the sorted sub-folders), optional ``root/val`` and ``root/test`` with the same classes, otherwise
    ``val_fraction`` of the training files held out with ``split_seed`` (the same split); empty class folders are
    refused and unreadable files raise with their path or, with ``on_error="skip"``, are skipped and listed. Every
    image is decoded once, here, to a uint8 ``(C, image_size, image_size)`` tensor (short side resized, centre
    crop) and stored raw with its int label: the training loaders then only copy bytes (no decoding in the loop), and
    the pixels are exactly those ImageFolderDataModule would produce (the same statistics). Raw storage costs
    ``C·image_size²`` bytes per image (192 KiB at 256², about 5x a JPEG); use a smaller ``image_size`` or more disk.

    The images are written in a random order (seeded by ``split_seed``) so that every chunk mixes the classes:
    streaming reads a few chunks at a time, and class-sorted chunks would give single-class batches.

    Each split goes to ``output_dir/<split>``: litdata's ``index.json`` and chunks, and ``traincraft.json`` with the
    class names, image size, channels, image count and the skipped files. Copy ``output_dir`` to object storage
    (``aws s3 sync``) to stream it from there.

    Args:
        root: the image folder, holding ``train/`` (and optionally ``val/``, ``test/``).
        output_dir: a local directory; one sub-directory per split is written.
        image_size: side of the stored square images.
        channels: 3 (RGB) or 1 (grayscale).
        val_fraction: share of the training files held out as ``val`` when there is no ``val/`` folder.
        split_seed: seed of that hold-out and of the write order.
        on_error: ``"raise"`` or ``"skip"`` unreadable files.
        num_workers: litdata processes decoding the images; default: one per CPU.
        chunk_bytes: target chunk size (litdata recommends tens of MB for object storage).
        overwrite: replace splits already optimized into ``output_dir``.
        start_method: multiprocessing start method of litdata's workers (default: litdata's, ``spawn``).
        verbose: print litdata's progress.

    Returns:
        The output directory of each split, e.g. ``{"train": ".../train", "val": ".../val"}``.

    Example:
        >>> dirs = optimize_image_folder("data/imagenet", "data/imagenet-256", image_size=256)  # doctest: +SKIP
        >>> dm = StreamingImageDataModule(dirs["train"], val_dir=dirs["val"])  # doctest: +SKIP
    """
    ld = _litdata()
    output = str(output_dir)
    if _is_remote(output):
        raise ValueError(
            f"output_dir must be a local directory; got {output!r}. Optimize into a local directory and copy it to "
            "object storage (e.g. `aws s3 sync`), then stream it with StreamingImageDataModule(train_dir='s3://...')."
        )
    if not isinstance(chunk_bytes, (int, str)) or (isinstance(chunk_bytes, int) and chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive integer or a size like '64MB'; got {chunk_bytes!r}.")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (or None: one per CPU); got {num_workers}.")
    # ImageFolderDataModule validates the options, discovers the classes and makes the split; nothing is decoded yet.
    reader = ImageFolderDataModule(str(root), image_size=image_size, channels=channels, val_fraction=val_fraction,
                                   split_seed=split_seed, on_error=on_error, augment="none", normalize=False)
    splits = reader.build_datasets()
    targets = {name: os.path.join(output, name) for name in splits}
    for target in targets.values():  # never write chunks into (or delete) the images being read
        for source in (Path(root, name).resolve() for name in ("train", "val", "test")):
            out = Path(target).resolve()
            if out == source or source in out.parents or out in source.parents:
                raise ValueError(f"output_dir {output} would write {target} over the images in {source}; choose a "
                                 "directory outside the image folder's train/val/test folders.")
    existing = [t for t in targets.values() if os.path.exists(os.path.join(t, "index.json"))]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already hold optimized data; set overwrite=True to replace them.")
    for name, dataset in splits.items():
        target = targets[name]
        if overwrite and os.path.isdir(target):
            shutil.rmtree(target)  # chunks of a larger earlier run would otherwise stay behind
        os.makedirs(target, exist_ok=True)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(split_seed)).tolist()
        log_dir = tempfile.mkdtemp(prefix="traincraft-optimize-")
        try:
            try:
                ld.optimize(
                    fn=_EncodeImage(dataset, log_dir), inputs=order,
                    output_dir=target, chunk_bytes=chunk_bytes, num_workers=num_workers, start_method=start_method,
                    verbose=verbose,
                )
            except Exception as error:
                errors = _read_logs(log_dir, ".error")
                if errors:  # the worker's own message names the file; litdata's wraps it in a traceback string
                    raise ValueError(errors[0]) from error
                raise
            skipped = sorted(_read_logs(log_dir, ".skipped"))
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
        written = len(dataset) - len(skipped)
        chunks = json.loads(Path(target, "index.json").read_text())["chunks"] if written else []
        if sum(chunk["chunk_size"] for chunk in chunks) != written:  # the workers' logs must account for every file
            raise RuntimeError(f"litdata wrote {sum(c['chunk_size'] for c in chunks)} images to {target} but "
                               f"{len(dataset)} files minus {len(skipped)} skipped ones were expected.")
        if written == 0:
            raise ValueError(f"every image of the {name!r} split of {root} was unreadable ({len(skipped)} files).")
        if skipped:
            warnings.warn(f"skipped {len(skipped)} unreadable image(s) of the {name!r} split: {', '.join(skipped[:5])}"
                          f"{' ...' if len(skipped) > 5 else ''} (all listed in {target}/{METADATA_FILE})", stacklevel=2)
        metadata = {
            "format": _FORMAT, "version": 1, "split": name, "classes": reader.classes, "image_size": image_size,
            "channels": channels, "num_images": written, "skipped": len(skipped), "skipped_files": skipped,
            "root": str(Path(root).absolute()),
        }
        Path(target, METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return targets


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
    ld = _litdata()

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
    """Images optimized by :func:`optimize_image_folder`, streamed with LitData from a local directory or object
    storage: for data sets larger than one machine's disk or memory.

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
        train_dir: the optimized training split (``output_dir/train`` of :func:`optimize_image_folder`).
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
        _litdata()
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
        if _is_remote(location):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, METADATA_FILE)
                try:
                    get_downloader(location, tmp, [], self.storage_options).download_file(
                        f"{location.rstrip('/')}/{METADATA_FILE}", local
                    )
                    text = Path(local).read_text()
                except Exception as error:  # each object store raises its own "not found"
                    raise _not_optimized(location, f"cannot read {METADATA_FILE} ({error})") from error
        else:
            folder = Path(location)
            if not folder.is_dir():
                raise _not_optimized(location, "no such directory")
            if not (folder / "index.json").is_file():
                raise _not_optimized(location, "it has no litdata index.json")
            if not (folder / METADATA_FILE).is_file():
                raise _not_optimized(location, f"it is a litdata data set without {METADATA_FILE} (class names, "
                                               "image size)")
            text = (folder / METADATA_FILE).read_text()
        metadata = json.loads(text)
        if metadata.get("format") != _FORMAT:
            raise _not_optimized(location, f"its {METADATA_FILE} has format {metadata.get('format')!r}")
        return metadata

    @property
    def classes(self) -> list[str]:
        return list(self.metadata("train")["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.metadata("train")["classes"])

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
        ld = _litdata()
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
        ld = _litdata()
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
        ld = _litdata()
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

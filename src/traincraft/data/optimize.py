"""The streaming writer: an image folder decoded once into LitData chunks for StreamingImageDataModule."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from traincraft.data._litdata import FORMAT, METADATA_FILE, is_remote, require_litdata
from traincraft.data.image_folder import ImageFolderDataModule, ImageFolderDataset


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
    """Write an image folder as LitData chunks for :class:`~traincraft.data.StreamingImageDataModule`.

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
    ld = require_litdata()
    output = str(output_dir)
    if is_remote(output):
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
            "format": FORMAT, "version": 1, "split": name, "classes": reader.classes, "image_size": image_size,
            "channels": channels, "num_images": written, "skipped": len(skipped), "skipped_files": skipped,
            "root": str(Path(root).absolute()),
        }
        Path(target, METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return targets

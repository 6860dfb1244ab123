"""Shared test helpers: small trainers, host-sync counting, reading W&B offline run files."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# torch functions that return a host value computed from device tensors
SYNC_FUNCTIONS = ("equal", "allclose", "is_nonzero")


@contextmanager
def count_host_syncs(counter: dict[str, int], enabled: list[bool]) -> Iterator[None]:
    """Count calls of tensor methods and torch functions that copy values to the host while ``enabled[0]`` is true.

    Calls made by ``torch.optim`` itself are not counted: without ``capturable=True`` its step counters are host
    tensors on every device, so reading them copies nothing from an accelerator.
    """
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    functions = {name: getattr(torch, name) for name in SYNC_FUNCTIONS}
    optim_dir = str(Path(torch.optim.__file__).parent)

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if enabled[0] and not sys._getframe(1).f_code.co_filename.startswith(optim_dir):
                counter[name] = counter.get(name, 0) + 1
            return original(self, *args, **kwargs)

        return counted

    def wrap_function(name, original):
        def counted(*args, **kwargs):
            if enabled[0]:
                counter[name] = counter.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    for name, original in functions.items():
        setattr(torch, name, wrap_function(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in functions.items():
            setattr(torch, name, original)


def tiny_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_wandb_records(run_dir: Path) -> list:
    """Parse the protobuf records of an offline W&B run file (``run-*.wandb``, LevelDB log format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B run file"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """The history rows of a finished offline run. Finishes any open run and stops the W&B service first: the
    service has written the whole run file only once it is gone (reading earlier can find it empty)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
    rows = []
    for record in read_wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


class SyncWindow(Callback):
    """Counts host syncs per training step, up to ``on_train_batch_end``.

    The window opens at ``on_train_batch_start``, or, given a ``datamodule``, earlier: when that DataModule's
    ``on_after_batch_transfer`` runs for a training batch (so augmentation and normalization are counted too).
    Use with :func:`count_host_syncs`: ``with count_host_syncs(window.current, window.enabled): trainer.fit(...)``;
    afterwards ``window.counts`` maps each step's ``global_step`` (counted after the step) to its calls.
    """

    def __init__(self, datamodule: pl.LightningDataModule | None = None) -> None:
        self.counts: dict[int, dict[str, int]] = {}
        self.current: dict[str, int] = {}
        self.enabled = [False]
        self._at_transfer = datamodule is not None
        if datamodule is not None:
            transfer = datamodule.on_after_batch_transfer

            def opening_transfer(batch, dataloader_idx):
                if datamodule.trainer.training:
                    self._open()
                return transfer(batch, dataloader_idx)

            datamodule.on_after_batch_transfer = opening_transfer

    def _open(self) -> None:
        self.current.clear()
        self.enabled[0] = True

    def on_train_batch_start(self, trainer, *args) -> None:
        if not self._at_transfer:
            self._open()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.enabled[0] = False
        self.counts[trainer.global_step] = dict(self.current)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call (rank 0 only, as Lightning's loggers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[Optional[int], dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

"""Column-parallel model state: keep one column of a TwoColumnAlexNet, slice, merge and export state dicts.

Parameter names do not change when a column is dropped (``columns.{c}.conv1.weight`` ...), so slicing a full state
dict and merging column shards are plain key operations; keys outside any column are shared and must agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from traincraft.models.two_column import TwoColumnAlexNet

__all__ = ["export_state_dict"]

_COLUMN_KEY = re.compile(r"(?:^|\.)columns\.(\d+)\.")
SHARD_TEMPLATE = "column-{column}.ckpt"


def shard_path(directory: Union[str, Path], column: int) -> Path:
    """Where column ``column``'s shard of a column-parallel checkpoint directory lives."""
    return Path(directory) / SHARD_TEMPLATE.format(column=column)


def key_column(key: str) -> Union[int, None]:
    """The column a state-dict key belongs to, ``None`` for a shared key.

    Example:
        >>> key_column("model.columns.1.fc6.weight"), key_column("columns.0.conv1.bias"), key_column("head.weight")
        (1, 0, None)
    """
    match = _COLUMN_KEY.search(key)
    return int(match.group(1)) if match else None


def column_slice(state_dict: Mapping[str, Any], column: int) -> dict[str, Any]:
    """The part of a state dict that a rank holding only ``column`` owns (its column's keys and shared keys)."""
    return {k: v for k, v in state_dict.items() if key_column(k) in (None, column)}


def merge_columns(shards: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Union of per-column state dicts; shared keys must hold equal tensors in every shard."""
    merged: dict[str, Any] = {}
    for shard in shards:
        for key, value in shard.items():
            if key in merged and key_column(key) is None:
                same = torch.equal(merged[key], value) if isinstance(value, torch.Tensor) else merged[key] == value
                if not same:
                    raise ValueError(
                        f"the column shards disagree on the shared entry {key!r}; they do not come from one "
                        "column-parallel checkpoint. Merge shards saved by the same run and step."
                    )
            elif key in merged:
                raise ValueError(f"two shards hold {key!r}: pass one shard per column.")
            merged[key] = value
    return merged


def keep_column(model: TwoColumnAlexNet, column: int) -> None:
    """Drop every column but ``column`` from ``model`` in place: afterwards it has the structure and parameter
    names of ``TwoColumnAlexNet(..., columns=[column])`` with the full model's weights for that column."""
    if column not in model.local_columns:
        raise ValueError(
            f"this TwoColumnAlexNet holds column(s) {list(model.local_columns)}, not column {column}: it was already "
            "split for another rank. Build the LightningModule afresh for each run."
        )
    for other in model.local_columns:
        if other != column:
            del model.columns[str(other)]
    model.local_columns = (column,)


def find_two_column_models(module: nn.Module) -> dict[str, TwoColumnAlexNet]:
    """``{qualified name: model}`` of every TwoColumnAlexNet inside ``module`` (outermost ones only)."""
    found: dict[str, TwoColumnAlexNet] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, TwoColumnAlexNet) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = sub
    return found


def load_full_model_weights(path: Union[str, Path], prefix: str) -> dict[str, torch.Tensor]:
    """A full TwoColumnAlexNet state dict from ``path``: a saved state dict (``columns.*`` keys) or a Lightning
    checkpoint whose ``state_dict`` holds the model under ``prefix`` (``"model."`` for ImageClassifier)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not any(key_column(k) is not None for k in state):
        raise ValueError(
            f"{path} holds no TwoColumnAlexNet weights (no 'columns.<c>.' keys under prefix {prefix!r}). Pass a "
            "state dict written by export_state_dict or a single-process checkpoint of the same model."
        )
    return state


def export_state_dict(checkpoint_dir: Union[str, Path], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Merge a column-parallel checkpoint directory into the state dict of a single-process TwoColumnAlexNet.

    Args:
        checkpoint_dir: the directory ``Trainer.save_checkpoint`` (or ``ModelCheckpoint``) wrote under
            :class:`~traincraft.strategies.column_parallel.ColumnParallelStrategy`; it holds one shard per column.
        prefix: where the model sits in the LightningModule (``"model."`` for ImageClassifier); only those keys
            are exported, with the prefix removed.

    Returns:
        ``{"columns.0.conv1.weight": ..., "columns.1.fc8.bias": ...}``, loadable with
        ``TwoColumnAlexNet(...).load_state_dict``.
    """
    directory = Path(checkpoint_dir)
    shards = sorted(directory.glob(SHARD_TEMPLATE.format(column="*")))
    if not directory.is_dir() or not shards:
        raise FileNotFoundError(
            f"{directory} is not a column-parallel checkpoint directory (no {SHARD_TEMPLATE.format(column='<c>')} "
            "files in it). Pass the path that Trainer.save_checkpoint or ModelCheckpoint wrote under the strategy."
        )
    states = [torch.load(shard, map_location="cpu", weights_only=True)["state_dict"] for shard in shards]
    merged = merge_columns(states)
    model = {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}
    if not model:
        raise ValueError(f"no keys under prefix {prefix!r} in {directory}; keys start with {sorted(merged)[:3]}.")
    return model

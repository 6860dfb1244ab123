"""Metric names of optimizer parameter groups, exactly as Lightning's ``LearningRateMonitor`` forms them.

Our extras (update ratios, oscillation, governor factors) use the same names, so a group reads the same
everywhere: ``lr-SGD``, ``lr-Adam/pg2``, ``lr-AdamW/head.*``, a scheduler's ``name``, ``lr-SGD-1`` for a second SGD.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import lightning.pytorch as pl
from torch.optim import Optimizer


def group_names(trainer: pl.Trainer) -> list[tuple[Optimizer, list[str]]]:
    """Each optimizer of the trainer (schedulers' optimizers first) with the names of its parameter groups."""
    result: list[tuple[Optimizer, list[str]]] = []
    seen: list[Optimizer] = []
    seen_types: defaultdict[type, int] = defaultdict(int)
    for config in trainer.lr_scheduler_configs:
        optimizer = config.scheduler.optimizer
        base = config.name if config.name is not None else "lr-" + type(optimizer).__name__
        result.append((optimizer, _names(optimizer, base, config.name, seen, seen_types)))
    for optimizer in trainer.optimizers:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed-style wrappers
        if optimizer in seen:
            continue
        result.append((optimizer, _names(optimizer, "lr-" + type(optimizer).__name__, None, seen, seen_types)))
    return result


def _names(optimizer: Optimizer, base: str, custom: Optional[str], seen: list, seen_types: defaultdict) -> list[str]:
    seen.append(optimizer)
    cls = type(optimizer)
    if custom is None:
        seen_types[cls] += 1
    if cls in seen_types and seen_types[cls] > 1:
        base = f"{base}-{seen_types[cls] - 1}"
    groups = optimizer.param_groups
    if len(groups) > 1:
        return [f"{base}/{group.get('name', f'pg{i + 1}')}" for i, group in enumerate(groups)]
    name = groups[0].get("name")
    return [f"{base}/{name}" if name else base]

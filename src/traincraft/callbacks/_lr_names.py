"""Metric names of optimizer parameter groups, asked of Lightning's own ``LearningRateMonitor``.

Our extras (update ratios, oscillation, governor factors) use the same names, so a group reads the same
everywhere: ``lr-SGD``, ``lr-Adam/pg2``, ``lr-AdamW/head.*``, a scheduler's ``name``, ``lr-SGD-1`` for a second SGD.
The names come from Lightning's naming methods rather than a copy of them, so the two cannot drift apart; those
methods read only their arguments (no state of the monitor), identically in Lightning 2.5 and 2.6.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.optim import Optimizer

# a namer only: the methods used below read no attribute of the instance, and constructing it checks nothing
_NAMER = LearningRateMonitor()


def group_names(trainer: pl.Trainer) -> list[tuple[Optimizer, list[str]]]:
    """Each optimizer of the trainer (schedulers' optimizers first) with the names of its parameter groups.

    Raises Lightning's ``MisconfigurationException`` when one optimizer has two groups of the same ``name``.
    """
    configs = trainer.lr_scheduler_configs
    scheduled, seen, seen_types = _NAMER._find_names_from_schedulers(configs)
    unscheduled, optimizers = _NAMER._find_names_from_optimizers(
        trainer.optimizers, seen_optimizers=seen, seen_optimizer_types=seen_types
    )
    pairs = [(config.scheduler.optimizer, names) for config, names in zip(configs, scheduled, strict=True)]
    return pairs + list(zip(optimizers, unscheduled, strict=True))

"""When a training step is a logging step: the only steps allowed to synchronize with the host."""

from __future__ import annotations

import lightning.pytorch as pl


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True on the optimizer steps at which Lightning sends metrics to the loggers.

    Lightning logs after the optimizer steps whose count is a multiple of ``log_every_n_steps`` (and on every
    step in ``fast_dev_run``); per-step code copies device statistics to the host only then.
    """
    if trainer.fast_dev_run:
        return True
    every = max(int(trainer.log_every_n_steps), 1)
    return (trainer.global_step + 1) % every == 0

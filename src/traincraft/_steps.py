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


def completed_step_is_logging(trainer: pl.Trainer) -> bool:
    """The same question asked in ``on_train_batch_end``, where the optimizer step is counted already.

    ``is_logging_step`` there would answer for the *next* step: per-batch-end code uses this one.
    """
    if trainer.fast_dev_run:
        return True
    every = int(trainer.log_every_n_steps)
    return every > 0 and trainer.global_step > 0 and trainer.global_step % every == 0

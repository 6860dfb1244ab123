"""When a training step is a logging step: the only steps allowed to synchronize with the host.

One rule for every callback, module and strategy, and it is Lightning's own: the logger connector logs a training
batch when ``(batches that stepped + 1) % log_every_n_steps == 0`` (or in ``fast_dev_run``, or when the fit is
stopping). "Batches that stepped" counts batches, not optimizer steps: a GAN with two optimizers under manual
optimization moves ``trainer.global_step`` by 2 per batch but this counter by 1, and the micro-batches of a
gradient-accumulation window do not move it at all. Deciding from ``global_step`` instead never fires for even
intervals under two optimizers, which is how monitors used to log nothing on GANs.

Lightning keeps that counter on the fit loop (``fit_loop.epoch_loop._batches_that_stepped``) and advances it after
``on_train_batch_end``, so the answer is the same in every hook of one training batch, from
``on_train_batch_start`` to ``on_train_batch_end``. It is read here only, so a change in Lightning breaks one place.
"""

from __future__ import annotations

import lightning.pytorch as pl


def batches_stepped(trainer: pl.Trainer) -> int:
    """Training batches whose optimizer step(s) completed in this fit: Lightning's logging counter.

    Inside a batch's hooks it counts the batches before this one (Lightning advances it after
    ``on_train_batch_end``); it survives checkpoint resume as Lightning restores it.
    """
    loop = trainer.fit_loop.epoch_loop
    count = getattr(loop, "_batches_that_stepped", None)
    if count is None:  # pragma: no cover - guards a Lightning release that renames the counter
        raise RuntimeError(
            "traincraft reads Lightning's count of batches that stepped (fit_loop.epoch_loop._batches_that_stepped) "
            f"to agree with Lightning on logging steps, and lightning {pl.__version__} has no such counter. "
            "Install a lightning version within the range traincraft's pyproject.toml states."
        )
    return int(count)


def batch_steps(trainer: pl.Trainer) -> bool:
    """True when the current training batch ends with an optimizer step (not a micro-batch of an accumulation).

    Under manual optimization every batch counts as stepping (Lightning refuses ``accumulate_grad_batches`` there).
    """
    if not trainer.lightning_module.automatic_optimization:
        return True
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True while Lightning will send this training batch's metrics to the loggers.

    Valid in every hook of the batch (``on_train_batch_start``, ``training_step``, ``on_before_optimizer_step``,
    optimizer step hooks, ``on_train_batch_end``). Under gradient accumulation it is true for every micro-batch of
    the logging window, as in Lightning; code that should act once per stepped batch also asks :func:`batch_steps`
    (see :func:`completed_step_is_logging`).
    """
    if trainer.fast_dev_run:
        return True
    every = int(trainer.log_every_n_steps)
    if every <= 0:
        return False
    return (batches_stepped(trainer) + 1) % every == 0 or bool(trainer.should_stop)


def completed_step_is_logging(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: this batch stepped and its metrics are logged (once per logging step).

    Lightning advances its counter only after ``on_train_batch_end``, so this is :func:`is_logging_step` restricted
    to the batch that closes an accumulation window.
    """
    return is_logging_step(trainer) and batch_steps(trainer)

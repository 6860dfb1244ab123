"""The callback through which traincraft's strategies log what they cost: bytes, stragglers, gradient noise scale.

Each strategy appends one :class:`StrategyMonitor` to the trainer and calls :meth:`StrategyMonitor.step_done`
after every optimizer step; the monitor closes the ledger's step, times it, accumulates the noise-scale terms on the
device and, on logging steps only, gathers its per-rank figures through the strategy and logs them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.metrics.noise_scale import (
    gradient_variance_estimate,
    simple_noise_scale,
    squared_gradient_norm_estimate,
)

if TYPE_CHECKING:
    from traincraft.strategies._base import MonitoredStrategy


def _batch_size(batch: Any) -> Optional[int]:
    """Leading dimension of the first tensor in a batch (tensor, sequence or mapping); metadata only."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size is not None:
                return size
    return None


class StrategyMonitor(Callback):
    """Added by a :class:`~traincraft.strategies._base.MonitoredStrategy` to the trainer: logs the strategy's
    ledger, and the per-rank step-time spread and the gradient noise scale where the strategy measures them.

    Args:
        strategy: the strategy that owns the ledger, the gradient sync state and the gather collective.
        state_key: the key of the ledger's totals in checkpoints; ``None`` when the strategy checkpoints its
            ledger itself (the column-parallel shards do).
    """

    def __init__(self, strategy: MonitoredStrategy, state_key: Optional[str] = "DataParallelMonitor") -> None:
        self.strategy = strategy
        self._state_key = state_key
        self.last_metrics: dict[str, float] = {}
        self._log_pending = False
        self._window_open = False
        self._samples = 0
        self._reset_interval()

    @property
    def state_key(self) -> str:
        return self._state_key or type(self).__name__

    def _reset_interval(self) -> None:
        self._busy_host = 0.0
        self._busy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._steps_timed = 0
        self._noise: Optional[torch.Tensor] = None
        self._noise_steps = 0

    # --- timing: from the first micro-batch's start to the moment the last gradient bucket is ready ---

    def _mark(self) -> Union[float, torch.cuda.Event]:
        if self.strategy.root_device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark_ready(self) -> None:
        if self._window_open:
            self._ready = self._mark()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not self._window_open:
            self._window_open = True
            self._samples = 0
            self._start = self._mark()
            self._ready = None
        self._samples += _batch_size(batch) or 0

    def step_done(self, logging: bool) -> None:
        """Called by the strategy after each optimizer step (all micro-batches' gradients synchronized)."""
        strategy = self.strategy
        strategy.ledger.end_step()
        norms = strategy.sync_state.close_step() if strategy.sync_state is not None else None
        if self._window_open and strategy.step_times:
            ready = self._ready if self._ready is not None else self._mark()
            if isinstance(ready, float):
                self._busy_host += ready - self._start
            else:
                self._busy_events.append((self._start, ready))
            self._steps_timed += 1
        b, world = self._samples, strategy.world_size
        if norms is not None and world > 1 and b > 0:
            local, reduced = norms
            # this rank's unbiased estimates: linear in its local norm, so their mean over ranks (taken on the
            # logging step) is the estimate from the mean local norm
            terms = torch.stack([
                gradient_variance_estimate(local, reduced, b, b * world),
                squared_gradient_norm_estimate(local, reduced, b, b * world),
            ])
            self._noise = terms if self._noise is None else self._noise + terms
            self._noise_steps += 1
        self._window_open = False
        self._log_pending = self._log_pending or logging

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._log_pending:
            return
        self._log_pending = False
        counts = self.strategy.ledger.metrics()
        metrics: dict[str, float] = {k: float(v) for k, v in counts.items()}
        if self.strategy.step_times or self.strategy.sync_state is not None:  # the same decision on every rank
            metrics.update(self._gathered_metrics())
        self._reset_interval()
        self.last_metrics = metrics
        for key, value in metrics.items():
            # byte counts in float64: exact, where self.log's float32 would round counts above 2**24
            logged = torch.tensor(value, dtype=torch.float64, device=pl_module.device) if key in counts else value
            pl_module.log(key, logged, on_step=True, on_epoch=False, sync_dist=False)

    def _gathered_metrics(self) -> dict[str, float]:
        """Step-time spread and noise scale from every rank's figures: one gather, on logging steps only."""
        device = self.strategy.root_device
        if self._busy_events:
            torch.cuda.synchronize(device)  # sync point: logging step only
            busy = sum(start.elapsed_time(end) for start, end in self._busy_events) / 1000.0
        else:
            busy = self._busy_host
        local = torch.zeros(3, dtype=torch.float64, device=device)
        local[0] = busy / max(self._steps_timed, 1)
        if self._noise is not None:
            local[1:] = self._noise
        values = self.strategy.gather_rows(local).cpu()  # sync point: logging step only
        metrics: dict[str, float] = {}
        if self.strategy.step_times and self._steps_timed:
            times = values[:, 0]
            median = float(torch.quantile(times, 0.5))
            metrics["ddp/step_time_max"] = float(times.max())
            metrics["ddp/step_time_median"] = median
            metrics["ddp/step_time_spread"] = float(times.max()) / median if median > 0 else float("nan")
        if self._noise is not None:
            variance = values[:, 1].mean() / self._noise_steps
            squared = values[:, 2].mean() / self._noise_steps
            metrics["ddp/grad_sq_norm"] = float(squared)
            metrics["ddp/grad_variance"] = float(variance)
            metrics["ddp/noise_scale"] = float(simple_noise_scale(squared, variance))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        # empty when the strategy keeps the ledger in its own checkpoint entry: Lightning then stores nothing
        return {"ledger": self.strategy.ledger.state_dict()} if self._state_key else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ledger" in state_dict:
            self.strategy.ledger.load_state_dict(state_dict["ledger"])

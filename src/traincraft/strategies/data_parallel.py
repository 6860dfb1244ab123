"""DataParallelStrategy: Lightning's DDP plus gradient compression that also works on CPU/gloo, communication
accounting, per-rank step-time spread (stragglers) and the gradient noise scale (critical batch size)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from traincraft._steps import is_logging_step
from traincraft.strategies._compression import COMPRESSIONS, GradientSyncState, make_comm_hook
from traincraft.strategies._noise_scale import (
    gradient_variance_estimate,
    simple_noise_scale,
    squared_gradient_norm_estimate,
)
from traincraft.strategies.communication import CommunicationLedger

Compression = Literal["none", "fp16", "bf16", "powersgd"]


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too (each rank's loss depends on
    every rank's contribution), recording both collectives."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, ledger: CommunicationLedger, world_size: int) -> torch.Tensor:
        ctx.ledger, ctx.world_size = ledger, world_size
        out = tensor.clone()
        ledger.record("all_reduce", out, world_size, axis="batchnorm")
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone()
        ctx.ledger.record("all_reduce", grad, ctx.world_size, axis="batchnorm")
        torch.distributed.all_reduce(grad)
        return grad, None, None


class _GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronized batch norm that also runs on CPU/gloo, where torch's ``SyncBatchNorm`` refuses to.

    Per channel, each rank contributes (Σx, Σx², count) in float64 to one all-reduce of 2C+1 elements (and one
    more in the backward pass): the statistics of the global batch, as ``nn.SyncBatchNorm`` computes them.
    Created from an ``nn.SyncBatchNorm`` (sharing its parameters and buffers) by the strategy on CPU only.
    """

    def __init__(self, source: nn.SyncBatchNorm, ledger: CommunicationLedger, world_size: int) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.training = source.training
        self.ledger, self.world_size = ledger, world_size

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...); got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.world_size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        x = input.double()
        count = x.new_full((1,), input.numel() // channels)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), x.square().sum(dims), count]), self.ledger,
                                    self.world_size)
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:-1] / total - mean.square()).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * total / (total - 1)).to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _replace_sync_batchnorm(module: nn.Module, ledger: CommunicationLedger, world_size: int) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):
        return _GlooSyncBatchNorm(module, ledger, world_size)
    for name, child in module.named_children():
        module.add_module(name, _replace_sync_batchnorm(child, ledger, world_size))
    return module


class _DataParallelMonitor(Callback):
    """Added by :class:`DataParallelStrategy` to the trainer: times steps, accumulates noise-scale terms on the
    device, and on logging steps gathers them across ranks (the only collective it adds) and logs."""

    def __init__(self, strategy: DataParallelStrategy) -> None:
        self.strategy = strategy
        self.last_metrics: dict[str, float] = {}
        self._log_pending = False
        self._window_open = False
        self._samples = 0
        self._reset_interval()

    @property
    def state_key(self) -> str:
        return "DataParallelMonitor"

    def _reset_interval(self) -> None:
        self._busy_host = 0.0
        self._busy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._steps_timed = 0
        self._noise: Optional[torch.Tensor] = None
        self._noise_steps = 0

    # --- timing: from the first micro-batch's start to the moment the last gradient bucket is ready ---

    def _cuda(self) -> bool:
        return self.strategy.root_device.type == "cuda"

    def _mark(self) -> Union[float, torch.cuda.Event]:
        if self._cuda():
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
        if self._window_open and self.strategy.step_times:
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
        metrics: dict[str, float] = {k: float(v) for k, v in self.strategy.ledger.metrics().items()}
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
        gathered = self._gather(local)
        values = gathered.cpu()  # sync point: logging step only
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
        self._reset_interval()
        self.last_metrics = metrics
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """(world, 3) rows of every rank's figures: the one collective the monitor adds, on logging steps only."""
        world = self.strategy.world_size
        if world == 1 or not torch.distributed.is_initialized():
            return local.reshape(1, -1)
        out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        torch.distributed.all_gather_into_tensor(out, local)
        return out.reshape(world, -1)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.strategy.ledger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.strategy.ledger.load_state_dict(state_dict["ledger"])


class DataParallelStrategy(DDPStrategy):
    """Distributed data parallel training (Lightning's ``DDPStrategy``) that also reports what it costs.

    Each rank holds a replica and trains on its shard of the global batch; gradients are averaged over ranks by
    a DDP communication hook chosen by name and registered on every backend, CPU/gloo included (Lightning's own
    ``ddp_comm_hook`` is silently ignored off CUDA). Every collective is recorded in :attr:`ledger`; on logging
    steps the strategy also logs the per-rank step-time spread and the simple gradient noise scale B_simple of
    McCandlish et al. 2018 from the local and the all-reduced gradient norms (no extra backward pass).

    ============================== =================================================================
    key                            meaning (logged on logging steps; works with no logger)
    ============================== =================================================================
    ``comm/data/all_reduce_bytes`` gradient bytes this rank contributed to all-reduces, last step
    ``comm/data/broadcast_bytes``  module buffers DDP broadcast from rank 0 (e.g. BatchNorm), last step
    ``comm/data/*_wire_bytes``     bytes sent under the ring algorithm (2(n-1)/n × all-reduce payload)
    ``comm/batchnorm/*_bytes``     synchronized batch-norm statistics (CPU with ``sync_batchnorm=True``)
    ``comm/bytes``                 all payload bytes of the last optimizer step
    ``comm/wire_bytes``            all ring-algorithm bytes of the last optimizer step
    ``ddp/step_time_median``       median over ranks of the mean busy time per step (s) since the last log
    ``ddp/step_time_max``          the slowest rank's mean busy time per step (s)
    ``ddp/step_time_spread``       max / median over ranks: 1.0 is balanced, 1.5 means a 50% straggler
    ``ddp/grad_sq_norm``           estimate of |G|², the squared norm of the true (full-data) gradient
    ``ddp/grad_variance``          estimate of tr(Σ), the per-example gradient variance
    ``ddp/noise_scale``            B_simple = tr(Σ)/|G|², an estimate of the critical batch size
    ============================== =================================================================

    A rank's busy time runs from the start of an optimizer step's first micro-batch to the moment its last
    gradient bucket is ready to all-reduce: the time it spends before it can communicate, excluding waits for
    slower ranks (which would equalize every rank's wall time). Collectives inside the forward or backward pass
    (synchronized batch norm) make fast ranks wait there and hide stragglers from this figure. The noise-scale
    terms assume the loss is a mean over the batch and equal local batch sizes; the estimate is averaged over the
    steps since the last log.

    With ``Trainer(sync_batchnorm=True)`` on CPU, torch's ``SyncBatchNorm`` (which DDP refuses off GPUs) is
    swapped for an equivalent synchronized batch norm that runs on gloo.

    Args:
        compression: how gradients travel: ``"none"`` (fp32), ``"fp16"``/``"bf16"`` (cast, halves the bytes),
            ``"powersgd"`` (rank-``powersgd_rank`` factors with error feedback).
        powersgd_rank: rank of the PowerSGD approximation (only with ``compression="powersgd"``).
        powersgd_warmup_steps: optimizer steps of uncompressed averaging before PowerSGD starts.
        noise_scale: estimate and log the gradient noise scale (two squared norms per bucket on the device).
        step_times: time steps and log their spread across ranks.
        find_unused_parameters: passed to ``DistributedDataParallel``.
        static_graph: passed to ``DistributedDataParallel``.
        bucket_cap_mb: gradient bucket size in MiB (``None``: DDP's default, 25).
        gradient_as_bucket_view: passed to ``DistributedDataParallel`` (saves one gradient copy).
        broadcast_buffers: passed to ``DistributedDataParallel`` (rank 0's buffers every forward).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin, process_group_backend,
            timeout, start_method: as in Lightning's ``DDPStrategy`` (the Trainer fills in the first ones).

    Raises:
        ValueError: on an unknown ``compression``, ``powersgd_rank < 1`` or set without PowerSGD, a negative
            ``powersgd_warmup_steps``, or ``bucket_cap_mb <= 0``.

    Example:
        >>> strategy = DataParallelStrategy(compression="powersgd", powersgd_rank=2)
        >>> strategy.compression, strategy.powersgd_rank, strategy.ledger.steps
        ('powersgd', 2, 0)
        >>> trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
    """

    strategy_name = "traincraft_ddp"

    def __init__(
        self,
        compression: Compression = "none",
        powersgd_rank: int = 1,
        powersgd_warmup_steps: int = 0,
        noise_scale: bool = True,
        step_times: bool = True,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        bucket_cap_mb: Optional[float] = None,
        gradient_as_bucket_view: bool = False,
        broadcast_buffers: bool = True,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r} is not supported; choose one of {COMPRESSIONS}")
        if not isinstance(powersgd_rank, int) or powersgd_rank < 1:
            raise ValueError(f"powersgd_rank must be an integer >= 1; got {powersgd_rank!r}")
        if powersgd_rank != 1 and compression != "powersgd":
            raise ValueError(
                f"powersgd_rank={powersgd_rank} has no effect with compression={compression!r}; "
                "set compression='powersgd' or leave powersgd_rank at 1"
            )
        if powersgd_warmup_steps < 0:
            raise ValueError(f"powersgd_warmup_steps must be >= 0; got {powersgd_warmup_steps}")
        if bucket_cap_mb is not None and bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0 (MiB) or None for DDP's default; got {bucket_cap_mb}")
        ddp_kwargs: dict[str, Any] = dict(
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
        )
        if not broadcast_buffers:  # only when switched off: recent torch warns on the argument itself
            ddp_kwargs["broadcast_buffers"] = False
        if bucket_cap_mb is not None:
            ddp_kwargs["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        self.compression = compression
        self.powersgd_rank = powersgd_rank
        self.powersgd_warmup_steps = powersgd_warmup_steps
        self.noise_scale = noise_scale
        self.step_times = step_times
        self.ledger = CommunicationLedger()
        self.sync_state: Optional[GradientSyncState] = None
        self.monitor = _DataParallelMonitor(self)

    @property
    def metrics(self) -> dict[str, float]:
        """The figures logged at the last logging step (also without any logger)."""
        return dict(self.monitor.last_metrics)

    def setup_environment(self) -> None:
        super().setup_environment()
        # before Lightning restores callbacks from a checkpoint, so the ledger's totals are restored too
        trainer = self.lightning_module.trainer
        if self.monitor not in trainer.callbacks:
            trainer.callbacks.append(self.monitor)

    def configure_ddp(self) -> None:
        if self.root_device.type == "cpu":
            # torch's SyncBatchNorm (what Trainer(sync_batchnorm=True) installs) only runs on GPUs
            _replace_sync_batchnorm(self.model, self.ledger, self.world_size)
        super().configure_ddp()
        model = self.model
        assert isinstance(model, DistributedDataParallel)
        self.sync_state = GradientSyncState(
            self.ledger,
            world_size=self.world_size,
            track_norms=self.noise_scale,
            on_ready=self.monitor.mark_ready if self.step_times else None,
        )
        hook = make_comm_hook(self.compression, self.powersgd_rank, self.powersgd_warmup_steps)
        model.register_comm_hook(self.sync_state, hook)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.modules_buffers)
        if buffer_bytes:
            model.register_forward_pre_hook(self._buffer_broadcast_recorder(buffer_bytes))

    def _buffer_broadcast_recorder(self, buffer_bytes: int) -> Callable[..., None]:
        def record(module: DistributedDataParallel, _: Any) -> None:
            # the same test DDP's forward makes just after this hook before broadcasting rank 0's buffers
            if module.will_sync_module_buffers():
                self.ledger.record("broadcast", buffer_bytes, self.world_size, is_source=self.global_rank == 0)

        return record

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[pl.LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        trainer = self.lightning_module.trainer
        logging = is_logging_step(trainer)  # decided before Lightning advances global_step
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if trainer.training:
            self.monitor.step_done(logging)
        return output

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        from traincraft.strategies._registry import register_strategies

        register_strategies(strategy_registry)

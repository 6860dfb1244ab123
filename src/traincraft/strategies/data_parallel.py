"""DataParallelStrategy: Lightning's DDP plus gradient compression that also works on CPU/gloo, communication
accounting, per-rank step-time spread (stragglers) and the gradient noise scale (critical batch size)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from torch.nn.parallel import DistributedDataParallel

from traincraft.strategies._base import MonitoredStrategy
from traincraft.strategies._compression import COMPRESSIONS, GradientSyncState, make_comm_hook
from traincraft.strategies._sync_batchnorm import replace_sync_batchnorm

Compression = Literal["none", "fp16", "bf16", "powersgd"]


class DataParallelStrategy(MonitoredStrategy):
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
    registered_names = {
        "traincraft_ddp": ("DDP with communication accounting, straggler and noise-scale logging", {}),
        "traincraft_ddp_fp16": ("traincraft_ddp with gradients all-reduced in fp16", {"compression": "fp16"}),
        "traincraft_ddp_bf16": ("traincraft_ddp with gradients all-reduced in bf16", {"compression": "bf16"}),
        "traincraft_ddp_powersgd": (
            "traincraft_ddp with rank-1 PowerSGD gradient compression",
            {"compression": "powersgd", "powersgd_rank": 1},
        ),
        "traincraft_ddp_powersgd_rank4": (
            "traincraft_ddp with rank-4 PowerSGD gradient compression",
            {"compression": "powersgd", "powersgd_rank": 4},
        ),
        "traincraft_ddp_spawn": ("traincraft_ddp started with multiprocessing spawn", {"start_method": "spawn"}),
    }

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
        super().__init__(accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
                         process_group_backend, timeout, start_method, step_times=step_times,
                         monitor_state_key="DataParallelMonitor", **ddp_kwargs)
        self.compression = compression
        self.powersgd_rank = powersgd_rank
        self.powersgd_warmup_steps = powersgd_warmup_steps
        self.noise_scale = noise_scale

    def configure_ddp(self) -> None:
        if self.root_device.type == "cpu":
            # torch's SyncBatchNorm (what Trainer(sync_batchnorm=True) installs) only runs on GPUs
            replace_sync_batchnorm(self.model, self.ledger)
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

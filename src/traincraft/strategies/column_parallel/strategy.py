"""ColumnParallelStrategy: one AlexNet column per rank (Krizhevsky et al. 2012), and the data x column hybrid."""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from traincraft.strategies._base import MonitoredStrategy
from traincraft.strategies._sync_batchnorm import GroupSyncBatchNorm, replace_sync_batchnorm
from traincraft.strategies.column_parallel.gather import ColumnExchange
from traincraft.strategies.column_parallel.mesh import ColumnMesh, build_groups
from traincraft.strategies.column_parallel.state import (
    column_slice,
    find_two_column_models,
    keep_column,
    load_full_model_weights,
    shard_path,
)
from traincraft.strategies.communication import CommunicationLedger

__all__ = ["ColumnParallelStrategy", "register_column_parallel"]

_COLUMNS = 2


class _DataAxisState:
    def __init__(self, group: dist.ProcessGroup, size: int, ledger: CommunicationLedger) -> None:
        self.group, self.size, self.ledger = group, size, ledger


# No annotations: DDP compares them with the real classes, and this module's are strings.
def _data_axis_hook(state, bucket):  # noqa: ANN001, ANN201
    """DDP communication hook over the data axis: average the bucket among replicas and account its bytes."""
    buffer = bucket.buffer()
    state.ledger.record("all_reduce", buffer, state.size, axis="data")
    work = dist.all_reduce(buffer.div_(state.size), group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class ColumnParallelStrategy(MonitoredStrategy):
    """Model parallelism as in Krizhevsky et al. 2012: each rank holds one column of a ``TwoColumnAlexNet``.

    The columns exchange activations only at the cross-connections (into conv3, fc6, fc7, fc8, and the logits)
    through autograd-aware all-gathers over the column group; each rank materializes only its column's parameters,
    gradients and optimizer state. Every column rank sees the same images and ends with the full logits, so the
    loss, the metrics and logging are those of a single-process run. With ``data_parallel_size > 1`` the ranks form
    a (data x column) mesh, the hybrid of Yadan et al. 2014: each column's gradients are averaged among its replicas
    only (DDP over the data group), and the sampler splits the data over the data dimension only.

    The LightningModule must hold a (full) ``TwoColumnAlexNet``, e.g. ``ImageClassifier("alexnet_two_column")``;
    when the processes start, the strategy drops the other column from it in place (keeping the full model's
    initial weights for its own) and routes ``exchange`` through the column group. Needs
    ``2 * data_parallel_size`` processes.

    Checkpoints are directories holding one shard per column (``column-0.ckpt``, ``column-1.ckpt``, each a full
    Lightning checkpoint of that column), written by the first replica of each column; ``ckpt_path=`` resumes from
    such a directory exactly. :func:`export_state_dict` merges one into the
    state dict of a single-process ``TwoColumnAlexNet``, and ``init_weights`` starts a run from such a state dict.

    With ``Trainer(sync_batchnorm=True)`` the batch norms of a column model are synchronized over that column's
    replicas (its data-parallel group: the other column's layers live on other ranks and see the same images); on
    CPU through a batch norm that runs on gloo, as under ``DataParallelStrategy``.

    Logged metrics (by the same monitor callback as ``DataParallelStrategy``'s, on logging steps; figures of the
    last optimizer step, per rank; also in :attr:`metrics` without any logger):

    ======================================  ========================================================
    key                                     meaning
    ======================================  ========================================================
    ``comm/column/all_gather_bytes``        activations this rank contributed to the forward gathers
    ``comm/column/reduce_scatter_bytes``    gradients it fed into the backward reduce-scatters
    ``comm/data/all_reduce_bytes``          gradient bytes all-reduced over the data axis (hybrid)
    ``comm/batchnorm/all_reduce_bytes``     synchronized batch-norm statistics (CPU, ``sync_batchnorm=True``)
    ``comm/{axis}/{kind}_wire_bytes``       bytes sent under ring algorithms, for each of the above
    ``comm/bytes``, ``comm/wire_bytes``     totals over both axes
    ======================================  ========================================================

    Args:
        data_parallel_size: replicas of each column; ``None`` takes ``world_size // 2``.
        init_weights: path of a full ``TwoColumnAlexNet`` state dict (or single-process checkpoint) to start from;
            each rank loads its column's part.
        process_group_backend: ``"gloo"``, ``"nccl"``, ...; default: Lightning's choice for the device.
        timeout: timeout of the collectives.
        start_method: how Lightning launches the processes, as in ``DDPStrategy``.
        **kwargs: passed to ``DistributedDataParallel`` over the data axis (e.g. ``bucket_cap_mb``).

    Example:
        >>> strategy = ColumnParallelStrategy(data_parallel_size=2)
        >>> strategy.data_parallel_size
        2
        >>> ColumnParallelStrategy(data_parallel_size=0)
        Traceback (most recent call last):
        ...
        ValueError: ColumnParallelStrategy: data_parallel_size must be a positive integer or None, got 0. ...
    """

    registered_names = {"column_parallel": ("one TwoColumnAlexNet column per rank (data x column mesh)", {})}

    def __init__(
        self,
        data_parallel_size: Optional[int] = None,
        init_weights: Optional[str] = None,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[Any] = None,
        checkpoint_io: Optional[Any] = None,
        precision_plugin: Optional[Any] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        if data_parallel_size is not None and (
            isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1
        ):
            raise ValueError(
                f"ColumnParallelStrategy: data_parallel_size must be a positive integer or None, got "
                f"{data_parallel_size!r}. Use None to take world_size // 2, or e.g. 2 for two replicas of each column."
            )
        if init_weights is not None and not Path(init_weights).is_file():
            raise FileNotFoundError(
                f"ColumnParallelStrategy: init_weights={init_weights!r} is not a file. Pass the path of a full "
                "TwoColumnAlexNet state dict (export_state_dict's output saved with torch.save) or of a "
                "single-process checkpoint."
            )
        super().__init__(accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
                         process_group_backend, timeout, start_method, step_times=False, monitor_state_key=None,
                         **kwargs)
        self._requested_data_size = data_parallel_size
        self._init_weights = init_weights
        self._ddp_options = dict(kwargs)
        self.mesh: Optional[ColumnMesh] = None
        self._column_group: Optional[dist.ProcessGroup] = None
        self._data_group: Optional[dist.ProcessGroup] = None

    # ----------------------------------------------------------------- the mesh
    @property
    def data_parallel_size(self) -> Optional[int]:
        """Replicas of each column (known once the processes are set up, unless given)."""
        return self.mesh.data_size if self.mesh is not None else self._requested_data_size

    @property
    def column(self) -> int:
        """The column this rank holds."""
        return self._coords()[1]

    @property
    def data_parallel_rank(self) -> int:
        """This rank's replica index along the data axis."""
        return self._coords()[0]

    @property
    def column_group(self) -> Optional[dist.ProcessGroup]:
        return self._column_group

    @property
    def data_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self._data_group

    @property
    def gradient_norm_group(self) -> Optional[dist.ProcessGroup]:
        """The group over which squared gradient norms must be summed to get the norm of the whole model: the
        column group (the replicas of a column hold equal, already averaged gradients)."""
        return self._column_group

    def _coords(self) -> tuple[int, int]:
        if self.mesh is None:
            raise RuntimeError("ColumnParallelStrategy: the mesh exists once the Trainer has set up the processes.")
        return self.mesh.coords(super().global_rank)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        data_rank, _ = self._coords()
        assert self.mesh is not None
        return {"num_replicas": self.mesh.data_size, "rank": data_rank}

    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        assert module is not None
        if not find_two_column_models(module):
            raise TypeError(
                f"ColumnParallelStrategy splits a TwoColumnAlexNet over ranks, but {type(module).__name__} holds "
                "none. Train ImageClassifier('alexnet_two_column', ...) (or a LightningModule with a "
                "TwoColumnAlexNet), or use a data-parallel strategy ('ddp') for other models."
            )
        world = self.world_size
        data_size = self._requested_data_size or max(world // _COLUMNS, 1)
        if world != _COLUMNS * data_size:
            raise ValueError(
                f"ColumnParallelStrategy needs {_COLUMNS} x data_parallel_size processes (one per column and "
                f"replica); got world_size={world} with data_parallel_size={self._requested_data_size}. Use "
                f"Trainer(devices={_COLUMNS * data_size}) (times num_nodes) or data_parallel_size={max(world // 2, 1)}"
                f"{' and an even device count' if world % 2 else ''}."
            )
        self.mesh = ColumnMesh(data_size, _COLUMNS)
        self._column_group, self._data_group = build_groups(self.mesh, super().global_rank, self.process_group_backend)
        self._partition()

    def _partition(self) -> None:
        module = self.lightning_module
        assert module is not None
        models = find_two_column_models(module)
        column = self.column
        for name, model in models.items():
            keep_column(model, column)
            # an instance attribute shadows the method: the model's forward stays the same code
            model.exchange = ColumnExchange(self._column_group, column, model.column_classes, self.ledger)
            if self._init_weights is not None:
                # in a Lightning checkpoint the model sits under its attribute path ("model." in ImageClassifier)
                full = load_full_model_weights(self._init_weights, f"{name}." if name else "")
                model.load_state_dict(column_slice(full, column))

    # ----------------------------------------------------------------- model and optimizers
    def setup(self, trainer: pl.Trainer) -> None:
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            # each column's GradScaler would find infs in its own gradients only and skip steps on its own
            raise ValueError(
                f"ColumnParallelStrategy does not support precision={trainer.precision!r} (float16 with a gradient "
                "scaler): the columns would skip steps independently. Use precision='bf16-mixed' or '32-true'."
            )
        if self._layer_sync is not None:
            # Trainer(sync_batchnorm=True): a column's batch statistics come from its replicas, not the world
            self._layer_sync = GroupSyncBatchNorm(self._data_group)
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)  # layer sync, precision, device, configure_ddp (the data axis), optimizers
            return
        # Outside fitting DDPStrategy.setup would broadcast rank 0's parameters over all ranks, overwriting
        # column 1 with column 0; only replicas of the same column may be synchronized.
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.mesh is not None and self.mesh.data_size > 1:
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=self.mesh.data_ranks(self.column)[0], group=self._data_group)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        assert self.mesh is not None and self._data_group is not None
        if self.root_device.type == "cpu":
            # torch's SyncBatchNorm (what sync_batchnorm=True installs) only runs on GPUs
            replace_sync_batchnorm(self.model, self.ledger)  # over the data group chosen in setup
        if self.mesh.data_size == 1:
            return  # every column exists once: no gradients to average
        self.model = DistributedDataParallel(
            self.model, device_ids=self.determine_ddp_device_ids(), process_group=self._data_group, **self._ddp_options
        )
        self.model.register_comm_hook(_DataAxisState(self._data_group, self.mesh.data_size, self.ledger), _data_axis_hook)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the shard holds only this rank's column, so the model must be split before loading

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        data_rank, column = self._coords()
        if data_rank != 0:
            return  # the replicas of a column hold the same weights and optimizer state
        assert self.mesh is not None
        checkpoint = {
            **checkpoint,
            "column_parallel": {"column": column, "columns": _COLUMNS, "data_parallel_size": self.mesh.data_size,
                                "ledger": self.ledger.state_dict()},
        }
        self.checkpoint_io.save_checkpoint(checkpoint, shard_path(filepath, column), storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not path.is_dir():
            raise ValueError(
                f"ColumnParallelStrategy resumes from the checkpoint directories it writes (one shard per column); "
                f"{path} is {'a file' if path.exists() else 'missing'}. To start a column-parallel run from a "
                "single-process model's weights, pass ColumnParallelStrategy(init_weights=...) instead of ckpt_path."
            )
        shard = shard_path(path, self.column)
        if not shard.is_file():
            raise FileNotFoundError(
                f"{path} has no shard for column {self.column} ({shard.name}); it is incomplete or was not written "
                "by ColumnParallelStrategy."
            )
        # Lightning's own checkpoint content (tensors, plain types) loads without unpickling arbitrary objects.
        checkpoint = _load_with(self.checkpoint_io, shard, True if weights_only is None else weights_only)
        if "ledger" in checkpoint.get("column_parallel", {}):
            self.ledger.load_state_dict(checkpoint["column_parallel"]["ledger"])  # byte totals continue
        return checkpoint


def _load_with(checkpoint_io: Any, path: Path, weights_only: bool) -> dict[str, Any]:
    """``checkpoint_io.load_checkpoint`` with ``weights_only`` where it takes one (lightning 2.6+; 2.5's has none)."""
    if "weights_only" in inspect.signature(checkpoint_io.load_checkpoint).parameters:
        return checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    return checkpoint_io.load_checkpoint(path)


def register_column_parallel(registry: Any = StrategyRegistry) -> None:
    """Make ``Trainer(strategy="column_parallel")`` build a :class:`ColumnParallelStrategy`; safe to call twice."""
    ColumnParallelStrategy.register_strategies(registry)

"""What traincraft's two strategies share on top of Lightning's ``DDPStrategy``: the byte ledger, the monitor
callback that logs it, and the one collective the monitor needs, so that both set up and log the same way."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer

from traincraft._steps import is_logging_step
from traincraft.strategies._compression import GradientSyncState
from traincraft.strategies._monitor import StrategyMonitor
from traincraft.strategies.communication import CommunicationLedger


class MonitoredStrategy(DDPStrategy):
    """A ``DDPStrategy`` that records its collectives in :attr:`ledger` and logs them through :attr:`monitor`.

    Subclasses pass Lightning's own constructor arguments positionally (in ``DDPStrategy``'s order), say whether
    steps are timed across ranks, and set :attr:`sync_state` when their gradient hooks measure norms. Their
    ``registered_names`` are what :meth:`register_strategies` adds to Lightning's registry (as Lightning's own
    strategies do; ``traincraft.strategies._registry`` calls it for every traincraft strategy).
    """

    # name -> (description, constructor arguments)
    registered_names: ClassVar[dict[str, tuple[str, dict[str, Any]]]] = {}

    def __init__(
        self,
        accelerator: Optional[pl.accelerators.Accelerator],
        parallel_devices: Optional[list[torch.device]],
        cluster_environment: Optional[Any],
        checkpoint_io: Optional[Any],
        precision_plugin: Optional[Any],
        process_group_backend: Optional[str],
        timeout: Optional[timedelta],
        start_method: str,
        *,
        step_times: bool,
        monitor_state_key: Optional[str],
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method, **ddp_kwargs,
        )
        self.step_times = step_times
        self.ledger = CommunicationLedger()
        self.sync_state: Optional[GradientSyncState] = None
        self.monitor = StrategyMonitor(self, monitor_state_key)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> list[str]:
        """Add this class's ``registered_names`` to a Lightning strategy registry; returns the names added.

        Calling it again is harmless: names already registered to this class are skipped, while a name taken by
        another class is an error (something else claimed it).
        """
        added = []
        for name, (description, init_params) in cls.registered_names.items():
            if name in strategy_registry:
                if strategy_registry[name]["strategy"] is cls:
                    continue
                raise ValueError(
                    f"strategy name {name!r} is already registered to {strategy_registry[name]['strategy'].__name__}"
                    f"; traincraft cannot register {cls.__name__} under it. Remove the other registration."
                )
            strategy_registry.register(name, cls, description=description, **init_params)
            added.append(name)
        return added

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

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """``(world, n)`` rows of every rank's 1-D ``local`` figures, over the whole world (the monitor's one
        collective, on logging steps only)."""
        world = self.world_size
        if world == 1 or not dist.is_initialized():
            return local.reshape(1, -1)
        out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(out, local)
        return out.reshape(world, -1)

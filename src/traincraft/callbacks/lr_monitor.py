"""LearningRateMonitor: Lightning's, unchanged, plus opt-in statistics that say whether the rate is too high."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor
from torch.optim import Optimizer

from traincraft._sharded import refuse_sharded
from traincraft._steps import batches_stepped, completed_step_is_logging, is_logging_step
from traincraft.callbacks._lr_names import group_names
from traincraft.callbacks._lr_updates import Oscillation, UpdateTracker, attach, release
from traincraft.metrics.updates import adam_effective_lr

_SKIPPED_HYPERPARAMETERS = {"lr", "initial_lr", "lr_multiplier", "params", "name"}


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (same arguments, metric names and errors) with opt-in extras.

    With the extras off it is Lightning's callback: changing the import changes nothing. The extras answer the
    theory's question "is the learning rate too high?" per parameter group: the update-to-weight ratio ‖Δθ‖/‖θ‖
    (near 1e-3 is healthy), and the oscillation index, an EMA of the cosine between consecutive updates (near -1:
    the weights oscillate across a valley, lower the rate; near +1: a steady direction, the rate may grow) with the
    EMA of the fraction of weights whose update changed sign. Updates are read with optimizer step hooks, so they
    are the real steps (skipped AMP steps are not counted). Per-step work stays on the device; extras are copied
    to the host once per logging step (``log_every_n_steps``), whatever ``logging_interval`` says.

    Logged keys (``<group>`` is Lightning's name, e.g. ``lr-SGD``, ``lr-Adam/pg2``, ``lr-AdamW/head.*``):

    ================================== =================================================================
    key                                when
    ================================== =================================================================
    ``<group>``                        always (Lightning's)
    ``<group>-momentum``               ``log_momentum`` (Lightning's: ``momentum`` or ``betas[0]``)
    ``<group>-weight_decay``           ``log_weight_decay`` (Lightning's)
    ``<group>-<hyperparameter>``       ``log_hyperparameters``: every numeric one, ``betas`` as ``beta1``
                                       and ``beta2`` (``eps``, ``weight_decay``, ``momentum``, ``alpha``...)
    ``<group>-effective_lr_mean``      ``log_effective_lr``, Adam/AdamW: mean of lr/(√v̂+ε) over weights
    ``<group>-effective_lr_min``       ... its minimum
    ``<group>-effective_lr_max``       ... its maximum
    ``<group>-update_ratio``           ``log_update_ratio``: ‖Δθ‖/‖θ‖ of the last step
    ``<group>-update_cosine``          ``log_oscillation``: EMA of cos(Δθₜ, Δθₜ₋₁)
    ``<group>-sign_flip``              ``log_oscillation``: EMA of the fraction of weights whose update flipped
    ================================== =================================================================

    Args:
        logging_interval: Lightning's: ``"step"``, ``"epoch"``, or ``None`` (each scheduler's own interval).
        log_momentum: Lightning's: also log momentum (``betas[0]`` for Adam-family).
        log_weight_decay: Lightning's: also log weight decay.
        log_hyperparameters: log every numeric hyperparameter of each group (betas, eps, weight decay, ...).
        log_effective_lr: for Adam/AdamW, statistics of the per-weight step size lr/(√v̂+ε).
        log_update_ratio: log ‖Δθ‖/‖θ‖ per group (weights are copied only before logging steps).
        log_oscillation: log the oscillation index per group (costs two flat copies of the weights and a few
            fused passes per step).
        oscillation_ema: smoothing of the oscillation EMAs, in ``[0, 1)``.
        **kwargs: passed to Lightning's ``LearningRateMonitor`` unchanged (arguments of newer Lightning releases).

    Raises:
        MisconfigurationException: Lightning's, for a bad ``logging_interval`` or a trainer without a logger.
        ValueError: at setup, when an extra (update ratio, oscillation, effective rate) is on and the module has
            sharded (DTensor) parameters: a per-shard norm would be logged as if it were global. Lightning's
            learning-rate keys alone work under any strategy.

    Example:
        >>> monitor = LearningRateMonitor(logging_interval="step", log_update_ratio=True, log_oscillation=True)
        >>> monitor.log_momentum, monitor.log_oscillation
        (False, True)
    """

    def __init__(
        self,
        logging_interval: Optional[Literal["step", "epoch"]] = None,
        log_momentum: bool = False,
        log_weight_decay: bool = False,
        log_hyperparameters: bool = False,
        log_effective_lr: bool = False,
        log_update_ratio: bool = False,
        log_oscillation: bool = False,
        oscillation_ema: float = 0.9,
        **kwargs: Any,
    ) -> None:
        # **kwargs: arguments a newer Lightning adds to its LearningRateMonitor reach it unchanged.
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum,
                         log_weight_decay=log_weight_decay, **kwargs)
        if not 0.0 <= oscillation_ema < 1.0:
            raise ValueError(f"oscillation_ema must lie in [0, 1); got {oscillation_ema}. 0.9 averages ~10 steps.")
        self.log_hyperparameters = log_hyperparameters
        self.log_effective_lr = log_effective_lr
        self.log_update_ratio = log_update_ratio
        self.log_oscillation = log_oscillation
        self.oscillation_ema = oscillation_ema
        self._trackers: dict[int, UpdateTracker] = {}
        self._oscillations: dict[int, Oscillation] = {}
        self._last_logged_step = -1
        self._pending_state: dict[str, Any] = {}

    @property
    def _tracks_updates(self) -> bool:
        return self.log_update_ratio or self.log_oscillation

    def _refuse_sharded(self, pl_module: pl.LightningModule) -> None:
        if self._tracks_updates or self.log_effective_lr:
            extras = [name for name, on in (("log_update_ratio", self.log_update_ratio),
                                            ("log_oscillation", self.log_oscillation),
                                            ("log_effective_lr", self.log_effective_lr)) if on]
            refuse_sharded(pl_module, type(self).__name__, f"its extras ({', '.join(extras)}: norms and cosines of "
                           "the weights, updates and Adam moments)")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._refuse_sharded(pl_module)

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._refuse_sharded(trainer.lightning_module)  # strategies may shard after setup
        super().on_train_start(trainer, *args, **kwargs)
        self._remove_hooks()
        self._oscillations = {}
        self._last_logged_step = -1
        if not self._tracks_updates:
            return

        def wants_step() -> bool:  # without the oscillation index, only the updates of logging steps are needed
            return self.log_oscillation or is_logging_step(trainer)

        for index, (optimizer, _) in enumerate(group_names(trainer)):
            # shared with a LearningRateGovernor of the same trainer: one copy of the weights for both
            tracker, oscillation = attach(self, optimizer, wants_step,
                                          self.oscillation_ema if self.log_oscillation else None)
            oscillation = oscillation or tracker.follow(self.oscillation_ema)  # never fed: a checkpoint of zeros
            if f"tracker{index}" in self._pending_state:
                oscillation.load_state_dict(self._pending_state[f"tracker{index}"])
            if f"update{index}" in self._pending_state:  # the first comparison after a resume needs the last update
                tracker.load_state_dict(self._pending_state[f"update{index}"])
            self._trackers[id(optimizer)] = tracker
            self._oscillations[id(optimizer)] = oscillation
        self._pending_state = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        extras = self.log_hyperparameters or self.log_effective_lr or self._tracks_updates
        if not extras or not completed_step_is_logging(trainer) or batches_stepped(trainer) == self._last_logged_step:
            return
        self._last_logged_step = batches_stepped(trainer)
        host: dict[str, float] = {}
        keys: list[str] = []
        device_values: list[torch.Tensor] = []
        for optimizer, names in group_names(trainer):
            if self.log_hyperparameters:
                for group, name in zip(optimizer.param_groups, names, strict=False):
                    host.update(self._hyperparameters(group, name))
            if self.log_effective_lr:
                for key, value in self._effective_lr(optimizer, names).items():
                    keys.append(key)
                    device_values.append(value)
            tracker = self._trackers.get(id(optimizer))
            if tracker is None or not tracker.has_update:
                continue
            if self.log_update_ratio:
                keys += [f"{name}-update_ratio" for name in names]
                device_values.append(tracker.ratios())
            oscillation = self._oscillations[id(optimizer)]
            if self.log_oscillation and oscillation.comparisons:
                cosine, flips = oscillation.value()
                keys += [f"{name}-update_cosine" for name in names] + [f"{name}-sign_flip" for name in names]
                device_values += [cosine, flips]
        if device_values:
            flat = torch.cat([v.reshape(-1).float() for v in device_values])
            host.update(zip(keys, flat.tolist(), strict=False))  # sync point: logging step only
        if host:
            pl_module.log_dict(host, on_step=True, on_epoch=False)

    def _hyperparameters(self, group: dict[str, Any], name: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for key, value in group.items():
            if key in _SKIPPED_HYPERPARAMETERS or isinstance(value, bool):
                continue
            if (key == "weight_decay" and self.log_weight_decay) or (key == "momentum" and self.log_momentum):
                continue  # Lightning's own key already carries it
            if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
                stem = "beta" if key == "betas" else key
                values.update({f"{name}-{stem}{i + 1}": float(v) for i, v in enumerate(value)})
            elif isinstance(value, (int, float)):
                values[f"{name}-{key}"] = float(value)
        return values

    def _effective_lr(self, optimizer: Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return {}
        stats = {}
        for group, name in zip(optimizer.param_groups, names, strict=False):
            sums, counts, lows, highs = [], 0, [], []
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                second = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
                if second is None:
                    continue
                rates = adam_effective_lr(float(group["lr"]), second, state["step"], group["betas"][1], group["eps"])
                sums.append(rates.sum())
                counts += rates.numel()
                lows.append(rates.min())
                highs.append(rates.max())
            if counts:
                stats[f"{name}-effective_lr_mean"] = torch.stack(sums).sum() / counts
                stats[f"{name}-effective_lr_min"] = torch.stack(lows).min()
                stats[f"{name}-effective_lr_max"] = torch.stack(highs).max()
        return stats

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        release(self, self._trackers)

    def state_dict(self) -> dict[str, Any]:
        if not self._oscillations:
            return dict(self._pending_state)  # loaded, not yet applied (at train start): saved again as it came
        state = {f"tracker{i}": oscillation.state_dict() for i, oscillation in enumerate(self._oscillations.values())}
        if self.log_oscillation and self._trackers:  # the latest update: one fp32 copy of the weights per optimizer
            state.update({f"update{i}": tracker.state_dict() for i, tracker in enumerate(self._trackers.values())})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)

"""LearningRateGovernor: a bounded per-group factor on the learning rate, steered by oscillation and sharpness."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from traincraft._sharded import refuse_sharded
from traincraft._steps import batches_stepped, completed_step_is_logging
from traincraft.callbacks._lr_names import group_names
from traincraft.callbacks._lr_updates import Oscillation, UpdateTracker, attach, release
from traincraft.callbacks.curvature import CurvatureMonitor


class LearningRateGovernor(Callback):
    """The theory's rule as a callback: lower a group's rate when its weights oscillate, raise it on a steady path.

    Each parameter group gets a factor f in ``[min_factor, max_factor]``; the optimizer steps with ``lr × f``. At
    every logging step (``log_every_n_steps``; deciding needs the signal on the host, and logging steps are the
    only ones allowed to synchronize) the governor reads, per group, the oscillation index (EMA of the cosine
    between consecutive updates, as :class:`~traincraft.callbacks.lr_monitor.LearningRateMonitor` logs it) and,
    if a :class:`~traincraft.callbacks.curvature.CurvatureMonitor` is in the trainer, its ``stability_ratio``
    (η·λ_max over the optimizer's threshold, global). Then: ``f ← f·down`` if the cosine is below
    ``oscillation_threshold`` or the stability ratio above ``sharpness_threshold``; else ``f ← f·up`` if the cosine
    is above ``steady_threshold``; else unchanged. Signals are averaged over ranks through ``trainer.strategy``
    first, so every rank takes the same decision.

    It composes with any scheduler: an optimizer step pre-hook sets ``lr = scheduled lr × f`` and a post-hook puts
    the scheduled value back, so schedulers (which step after the optimizer) and checkpoints never see the factor
    and nothing compounds. Lightning's ``LearningRateMonitor`` therefore logs the scheduled rate; the governor
    logs the factor and the rate actually used.

    ===================================== ==========================================================
    key                                   meaning
    ===================================== ==========================================================
    ``governor/<group>/factor``           the factor f after this decision
    ``governor/<group>/decision``         -1 (down), 0 (kept) or +1 (up)
    ``governor/<group>/lr``               the rate the optimizer steps with: scheduled lr × f
    ``governor/<group>/update_cosine``    the oscillation index the decision read
    ===================================== ==========================================================

    ``<group>`` is Lightning's group name without its ``lr-`` prefix (``SGD``, ``Adam/pg2``, ``AdamW/head.*``).

    Args:
        down: multiplicative step down, in ``(0, 1)``.
        up: multiplicative step up, ``>= 1`` (1 never raises).
        min_factor: lower bound of f, in ``(0, 1]``.
        max_factor: upper bound of f, ``>= 1``.
        oscillation_threshold: cosine below which a group oscillates, in ``[-1, 1]``.
        steady_threshold: cosine above which a group follows a steady direction, above ``oscillation_threshold``.
        sharpness_threshold: stability ratio above which all groups go down (needs a CurvatureMonitor).
        ema: smoothing of the update cosine, in ``[0, 1)``.
        warmup_steps: optimizer steps before the first decision.

    Example:
        >>> governor = LearningRateGovernor(down=0.5, up=1.1, max_factor=2.0)
        >>> governor.state_key
        "LearningRateGovernor{'down': 0.5, 'up': 1.1, 'min_factor': 0.01, 'max_factor': 2.0}"
    """

    def __init__(
        self,
        down: float = 0.7,
        up: float = 1.05,
        min_factor: float = 0.01,
        max_factor: float = 10.0,
        oscillation_threshold: float = -0.2,
        steady_threshold: float = 0.3,
        sharpness_threshold: float = 0.9,
        ema: float = 0.9,
        warmup_steps: int = 10,
    ) -> None:
        checks = (
            ("down", down, 0.0 < down < 1.0, "in (0, 1)"),
            ("up", up, 1.0 <= up < math.inf, ">= 1"),
            ("min_factor", min_factor, 0.0 < min_factor <= 1.0, "in (0, 1]"),
            ("max_factor", max_factor, 1.0 <= max_factor < math.inf, ">= 1"),
            ("oscillation_threshold", oscillation_threshold, -1.0 <= oscillation_threshold <= 1.0, "in [-1, 1]"),
            ("steady_threshold", steady_threshold, oscillation_threshold < steady_threshold <= 1.0,
             f"in (oscillation_threshold={oscillation_threshold}, 1]"),
            ("sharpness_threshold", sharpness_threshold, 0.0 < sharpness_threshold < math.inf, "> 0"),
            ("ema", ema, 0.0 <= ema < 1.0, "in [0, 1)"),
            ("warmup_steps", warmup_steps, isinstance(warmup_steps, int) and warmup_steps >= 0, "an integer >= 0"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"LearningRateGovernor: {name} must be {allowed}; got {value!r}.")
        self.down, self.up = float(down), float(up)
        self.min_factor, self.max_factor = float(min_factor), float(max_factor)
        self.oscillation_threshold = oscillation_threshold
        self.steady_threshold = steady_threshold
        self.sharpness_threshold = sharpness_threshold
        self.ema = ema
        self.warmup_steps = warmup_steps
        self.factors: dict[str, float] = {}  # by group name; plain floats so the checkpoint loads weights_only
        self.decisions = 0
        self._trackers: dict[int, UpdateTracker] = {}
        self._oscillations: dict[int, Oscillation] = {}
        self._names: dict[int, list[str]] = {}
        self._scheduled: dict[int, list[Any]] = {}
        self._handles: list[RemovableHandle] = []
        self._last_decision_step = -1
        self._seen_probes = 0
        self._pending_oscillations: dict[str, Any] = {}  # loaded before on_train_start attached the trackers
        self._pending_updates: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(down=self.down, up=self.up, min_factor=self.min_factor,
                                        max_factor=self.max_factor)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(pl_module, type(self).__name__, "the update cosines it decides from")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(pl_module, type(self).__name__, "the update cosines it decides from")  # sharded after setup
        self._remove_hooks()
        self._names, self._oscillations = {}, {}
        self._last_decision_step = -1
        self._seen_probes = 0
        for index, (optimizer, names) in enumerate(group_names(trainer)):
            key = id(optimizer)
            self._names[key] = [name.removeprefix("lr-") for name in names]
            # shared with a LearningRateMonitor of the same trainer: one copy of the weights for both
            self._trackers[key], self._oscillations[key] = attach(self, optimizer, lambda: True, self.ema)
            if f"opt{index}" in self._pending_oscillations:  # a resumed fit decides from the same averages
                self._oscillations[key].load_state_dict(self._pending_oscillations[f"opt{index}"])
            if f"opt{index}" in self._pending_updates:  # and compares its first update with the saved last one
                self._trackers[key].load_state_dict(self._pending_updates[f"opt{index}"])
            for name in self._names[key]:
                self.factors.setdefault(name, 1.0)
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._pending_oscillations, self._pending_updates = {}, {}

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        self._scheduled[key] = [group["lr"] for group in optimizer.param_groups]
        for group, name in zip(optimizer.param_groups, self._names[key], strict=False):
            group["lr"] = group["lr"] * self.factors[name]

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        for group, scheduled in zip(optimizer.param_groups, self._scheduled.pop(key, []), strict=False):
            group["lr"] = scheduled  # the scheduler steps next: it must see its own value, not ours

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = batches_stepped(trainer) + 1  # training batches that stepped, this one included
        if step < self.warmup_steps or step == self._last_decision_step or not completed_step_is_logging(trainer):
            return
        if not self._trackers:
            return
        self._last_decision_step = step
        cosines = [oscillation.value()[0] for oscillation in self._oscillations.values()]
        curvature = next((cb for cb in trainer.callbacks if isinstance(cb, CurvatureMonitor)), None)
        ratio = None
        if curvature is not None and curvature.probes > self._seen_probes:  # a stale probe must not act twice
            self._seen_probes = curvature.probes
            ratio = curvature.last.get("stability_ratio")
        signal = torch.cat([*cosines, (ratio if ratio is not None else torch.zeros((), device=cosines[0].device))
                            .reshape(1).to(cosines[0].device)])
        signal = trainer.strategy.reduce(signal, reduce_op="mean")
        values = signal.tolist()  # sync point: logging step only
        too_sharp = ratio is not None and values[-1] > self.sharpness_threshold
        logged: dict[str, float] = {}
        index = 0
        for key, names in self._names.items():
            optimizer = self._trackers[key].optimizer
            for group, name in zip(optimizer.param_groups, names, strict=False):
                cosine = values[index]
                index += 1
                if too_sharp or cosine < self.oscillation_threshold:
                    decision = -1
                elif cosine > self.steady_threshold:
                    decision = 1
                else:
                    decision = 0
                factor = self.factors[name] * (self.down if decision < 0 else self.up if decision > 0 else 1.0)
                self.factors[name] = min(max(factor, self.min_factor), self.max_factor)
                logged.update({
                    f"governor/{name}/factor": self.factors[name],
                    f"governor/{name}/decision": float(decision),
                    f"governor/{name}/lr": float(group["lr"]) * self.factors[name],
                    f"governor/{name}/update_cosine": cosine,
                })
        self.decisions += 1
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        release(self, self._trackers)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        oscillations = {f"opt{index}": oscillation.state_dict()
                        for index, oscillation in enumerate(self._oscillations.values())} or self._pending_oscillations
        updates = {f"opt{index}": tracker.state_dict()
                   for index, tracker in enumerate(self._trackers.values())} or self._pending_updates
        return {"factors": dict(self.factors), "decisions": self.decisions, "oscillations": dict(oscillations),
                "updates": dict(updates)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factors = {str(k): float(v) for k, v in state_dict.get("factors", {}).items()}
        self.decisions = int(state_dict.get("decisions", 0))
        self._pending_oscillations = dict(state_dict.get("oscillations", {}))  # both absent before 0.3.0
        self._pending_updates = dict(state_dict.get("updates", {}))


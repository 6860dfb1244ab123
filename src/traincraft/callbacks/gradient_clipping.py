"""GradientClipping: clip by norm, value, AGC, quantile or z-score; skip non-finite steps; log gradient health."""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from traincraft._steps import batch_steps, is_logging_step
from traincraft.callbacks._clip_guard import BufferGuard, Slot, global_tensor_norms, local, shard_groups
from traincraft.metrics.grad_norms import (
    agc_coefficient,
    clip_coefficient,
    depth_slope,
    ema_moments,
    norm_from_power,
    norm_power,
    quantile_threshold,
    tensor_norms,
    zscore_threshold,
)

Mode = Literal["norm", "value", "agc", "quantile", "zscore"]
_SKIP_METHODS = ("auto", "found_inf", "snapshot", "sync")


_FLOATS = ("threshold", "norm_type", "agc_clipping", "agc_eps", "quantile", "z_threshold", "ema_decay")
_INTS = ("history_size", "warmup_steps", "max_consecutive_skips")
_BOOLS = ("per_layer", "skip_spikes", "restore_buffers", "log_layer_norms", "log_depth_profile")


def _check_types(args: dict[str, Any]) -> None:
    """Wrong types (a YAML string, a bool for a number) named before any comparison fails obscurely."""
    for name in _FLOATS:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); write it without "
                            "quotes, e.g. 1.0 (inf for norm_type is float('inf') or .inf in YAML).")
    for name in _INTS:
        value = args[name]
        if (value is not None or name != "max_consecutive_skips") and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}); "
                            f"e.g. {name}=10" + (" or None" if name == "max_consecutive_skips" else "") + ".")
    for name in _BOOLS:
        if not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, got {args[name]!r} ({type(args[name]).__name__}).")


class GradientClipping(Callback):
    """Clip gradients once per optimizer step, skip steps whose gradient is not finite, and log what happened.

    Runs in ``on_before_optimizer_step``: after gradient accumulation and after AMP unscaling, so it sees the
    gradients the optimizer is about to apply. Each optimizer is clipped by the norm of its own parameters'
    gradients and keeps its own thresholds, histories and skip counters. Under manual optimization, call
    ``self.manual_backward(loss)`` and then ``opt.step()`` on the LightningOptimizer that ``self.optimizers()``
    returns: Lightning calls the hook inside it (never step the raw ``torch.optim`` optimizer, which bypasses the
    hook and AMP unscaling), and do not also call ``self.clip_gradients``, which would clip first.

    Modes (``threshold`` is the max norm for ``norm`` and the max absolute entry for ``value``):

    - ``norm``: rescale so that the global ``norm_type``-norm is at most ``threshold``.
    - ``value``: clamp every entry to ``[-threshold, threshold]`` (changes the direction).
    - ``agc``: adaptive gradient clipping (Brock et al. 2021): each unit's gradient norm at most ``agc_clipping``
      times its weight norm (floored at ``agc_eps``); the output layer is excluded by default.
    - ``quantile``: AutoClip (Seetharaman et al. 2020): the threshold is the ``quantile`` of the last
      ``history_size`` norms, the current one included.
    - ``zscore``: ZClip (Kumar et al. 2025): after ``warmup_steps`` steps that set the mean and variance of the norm,
      a norm above ``mean + z_threshold·std`` is a spike and is clipped to that value; the moments then follow an
      EMA (``ema_decay``) of the clipped norm.

    ``per_layer=True`` applies ``norm``, ``quantile`` and ``zscore`` to each parameter tensor separately.

    Under model parallelism, the strategy's ``gradient_norm_group`` (a process group whose ranks hold different
    parameters, e.g. the columns of ``ColumnParallelStrategy``) all-reduces the p-th powers, so every rank clips
    by the same global norm. Sharded parameters (DTensor, ``fully_shard``) add the powers of their shards over the
    mesh: norms are those of whole parameters (``agc`` refuses them). Under data parallelism gradients are
    already averaged: nothing is reduced.

    The guard ladder: a step whose gradient norm is not finite is always skipped: weights, momentum buffers, Adam
    moments and step counts stay bit-identical, and so do the module's persistent buffers that the forward pass
    wrote (BatchNorm running statistics and ``num_batches_tracked``, as at the start of the accumulation window;
    ``restore_buffers``). With ``skip_spikes``, a step whose norm is above the threshold is
    skipped instead of clipped. After ``max_consecutive_skips`` skipped steps in a row, ``on_consecutive_skips``
    raises an error or restores the last healthy in-memory snapshot (taken at logging steps). How a step is skipped
    (``skip_method``):

    - ``found_inf`` (picked by ``auto`` for ``fused=True`` optimizers, except under fp16 AMP, whose scaler owns that
      attribute): the flag goes to the fused kernel, which leaves everything untouched. No sync, no copy.
    - ``snapshot`` (``auto`` for other optimizers on an accelerator): parameters and optimizer state are copied
      before the update and put back
      with ``torch.where`` after it. No sync; costs one copy of parameters and optimizer state per step. (On a GPU,
      non-fused Adam keeps its step counts on the host unless ``capturable=True``: restoring them reads the flag,
      one scalar per step. Prefer ``fused=True``.)

    With both, the one step at which the optimizer creates its state (usually the first) must know the flag to
    undo the creation: that step reads one scalar on the host.
    - ``sync`` (``auto`` for other optimizers on the CPU, where reading a scalar is a memory load and no device
      sync): read the flag on the host every step (one scalar, a real sync on GPUs) and drop the gradients of a
      skipped step, so the optimizer leaves those parameters alone. No copy.

    The count of consecutive skips is checked when the statistics reach the host: at logging steps, or every step
    with ``sync``.

    Logged at the logging interval (one host copy per log and optimizer). With several optimizers every key but
    the per-tensor norms ends in ``/opt<i>``, ``i`` the optimizer's index in ``trainer.optimizers`` (the order
    ``configure_optimizers`` returns them); with one optimizer the keys are as below:

    ============================ ========================================================================
    key                          meaning
    ============================ ========================================================================
    ``grad/norm_pre``            global gradient norm before clipping (this step)
    ``grad/norm_post``           global gradient norm after clipping (this step)
    ``grad/clip_coef``           ``norm_post / norm_pre`` (1: untouched)
    ``grad/clipped_frac``        fraction of optimizer steps since the last log whose gradient was clipped
    ``grad/threshold``           threshold in use (``norm``, ``value``, ``quantile``, ``zscore``; not per layer)
    ``grad/skipped_steps``       skipped steps since the start of training (non-finite or spikes)
    ``grad/norm/<param name>``   per-tensor gradient norm before clipping (``log_layer_norms``)
    ``grad/depth_slope``         slope of ln(norm) per weight layer, output to input (``log_depth_profile``):
                                 < 0 vanishing, > 0 exploding
    ============================ ========================================================================

    Args:
        mode: ``"norm"``, ``"value"``, ``"agc"``, ``"quantile"`` or ``"zscore"``.
        threshold: max norm (``norm``) or max absolute entry (``value``).
        norm_type: p of the gradient p-norm (``inf`` allowed).
        per_layer: clip each parameter tensor by its own norm (``norm``, ``quantile``, ``zscore``).
        agc_clipping: AGC's λ, the largest gradient-to-weight norm ratio per unit.
        agc_eps: floor on the unit weight norm in AGC.
        agc_exclude: glob patterns of parameter names AGC leaves alone; ``None``: the last layer (the output
            layer, as in Brock et al.); ``[]``: none.
        quantile: quantile of the norm history used as threshold (AutoClip's 10th percentile is 0.1).
        history_size: how many recent norms the quantile sees.
        z_threshold: how many standard deviations above the mean a norm becomes a spike.
        ema_decay: decay of ZClip's moving mean and variance.
        warmup_steps: steps that estimate ZClip's first mean and variance; nothing is clipped meanwhile.
        skip_spikes: skip (rather than clip) a step whose norm is above the threshold.
        max_consecutive_skips: skipped steps in a row that trigger ``on_consecutive_skips``; ``None``: never.
        on_consecutive_skips: ``"raise"`` an error, or ``"restore"`` the last healthy snapshot (once per snapshot).
        skip_method: ``"auto"``, ``"found_inf"``, ``"snapshot"`` or ``"sync"`` (see above).
        restore_buffers: also undo a skipped step's writes to persistent module buffers (a copy of the buffers
            per accumulation window; ``False`` leaves BatchNorm statistics to the bad batch).
        log_layer_norms: also log each parameter tensor's gradient norm.
        log_depth_profile: also log the depth slope.

    Example:
        >>> from traincraft.data import DigitsDataModule
        >>> from traincraft.modules import ImageClassifier
        >>> clip = GradientClipping(mode="norm", threshold=0.5)
        >>> trainer = pl.Trainer(max_steps=2, limit_val_batches=0, callbacks=[clip], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8),
        ...             datamodule=DigitsDataModule(image_size=8))
        >>> clip.state_dict()["steps"]
        2
    """

    def __init__(
        self,
        mode: Mode = "norm",
        threshold: float = 1.0,
        norm_type: float = 2.0,
        per_layer: bool = False,
        agc_clipping: float = 0.01,
        agc_eps: float = 1e-3,
        agc_exclude: Optional[list[str]] = None,
        quantile: float = 0.1,
        history_size: int = 1000,
        z_threshold: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        skip_spikes: bool = False,
        max_consecutive_skips: Optional[int] = 10,
        on_consecutive_skips: Literal["raise", "restore"] = "raise",
        skip_method: Literal["auto", "found_inf", "snapshot", "sync"] = "auto",
        restore_buffers: bool = True,
        log_layer_norms: bool = False,
        log_depth_profile: bool = False,
    ) -> None:
        _check_types(locals())
        if mode not in ("norm", "value", "agc", "quantile", "zscore"):
            raise ValueError(f"mode={mode!r} is not one of 'norm', 'value', 'agc', 'quantile', 'zscore'.")
        if not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}; e.g. 1.0 for "
                             "mode='norm' or 0.01 for mode='value'.")
        if not (norm_type == math.inf or norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}; 2.0 is the usual L2 norm.")
        if per_layer and mode in ("value", "agc"):
            raise ValueError(f"per_layer=True has no meaning for mode={mode!r}, which already acts per entry/unit; "
                             "drop per_layer.")
        if skip_spikes and mode == "agc":
            raise ValueError("skip_spikes=True needs a norm threshold, and mode='agc' has none per step; use "
                             "mode='norm', 'quantile' or 'zscore', or set skip_spikes=False.")
        if not (agc_clipping > 0 and agc_eps >= 0 and math.isfinite(agc_clipping) and math.isfinite(agc_eps)):
            raise ValueError(f"agc_clipping must be > 0 and agc_eps >= 0 (finite), got {agc_clipping}, {agc_eps}; "
                             "Brock et al. use 0.01 and 1e-3.")
        if isinstance(agc_exclude, str):
            raise ValueError(f"agc_exclude must be a list of glob patterns, got the string {agc_exclude!r}; write "
                             f"agc_exclude=[{agc_exclude!r}].")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}; AutoClip uses 0.1.")
        if history_size < 1 or warmup_steps < 0:
            raise ValueError(f"history_size must be >= 1 and warmup_steps >= 0, got {history_size}, {warmup_steps}; "
                             "AutoClip keeps 1000 norms and ZClip warms up for 25 steps.")
        if not (z_threshold > 0 and math.isfinite(z_threshold) and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"need 0 < z_threshold < inf and 0 <= ema_decay < 1, got {z_threshold}, {ema_decay}; "
                             "ZClip uses 2.5 and 0.97.")
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}; None never "
                             "stops training, 10 is the default.")
        if on_consecutive_skips not in ("raise", "restore"):
            raise ValueError(f"on_consecutive_skips={on_consecutive_skips!r} is not 'raise' or 'restore'.")
        if skip_method not in _SKIP_METHODS:
            raise ValueError(f"skip_method={skip_method!r} is not one of {_SKIP_METHODS}.")
        self.mode, self.threshold, self.norm_type, self.per_layer = mode, float(threshold), float(norm_type), per_layer
        self.agc_clipping, self.agc_eps, self.agc_exclude = agc_clipping, agc_eps, agc_exclude
        self.quantile, self.history_size = quantile, history_size
        self.z_threshold, self.ema_decay, self.warmup_steps = z_threshold, ema_decay, warmup_steps
        self.skip_spikes, self.max_consecutive_skips = skip_spikes, max_consecutive_skips
        self.on_consecutive_skips, self.skip_method = on_consecutive_skips, skip_method
        self.restore_buffers = restore_buffers
        self.log_layer_norms, self.log_depth_profile = log_layer_norms, log_depth_profile
        self._slots: list[Slot] = []  # one per optimizer, kept across fits (their statistics are training state)
        self._by_optimizer: dict[int, Slot] = {}
        self._loaded: Optional[list[dict[str, Any]]] = None
        self._buffers: Optional[BufferGuard] = None
        self._window_open = False  # an accumulation window's buffer snapshot is taken
        self._fitting = False  # between on_fit_start and teardown: a loaded state applies at once

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, per_layer=self.per_layer)

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) and the GradientClipping callback would both "
                "clip the gradients: remove gradient_clip_val (and gradient_clip_algorithm) from the Trainer, and "
                "give the callback its threshold instead (GradientClipping(threshold=...))."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        seen: dict[int, int] = {}
        for i, optimizer in enumerate(optimizers):
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if seen.setdefault(id(p), i) != i:
                        raise ValueError(f"a parameter is in optimizers {seen[id(p)]} and {i}: GradientClipping "
                                         "clips each optimizer by the norm of its own parameters, so each must hold "
                                         "different ones. Give every parameter to one optimizer only.")
        all_params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        groups = shard_groups(all_params, type(self).__name__)
        if groups is not None and self.mode == "agc":
            raise ValueError("GradientClipping(mode='agc') cannot run on sharded parameters (DTensor): the norm of a "
                             "unit may be split over ranks. Use mode='norm', 'quantile' or 'zscore', which reduce "
                             "the norms over the shards, or train with an unsharded strategy.")
        if groups is not None and getattr(trainer.strategy, "gradient_norm_group", None) is not None:
            raise ValueError(f"{type(trainer.strategy).__name__} names a gradient_norm_group and the parameters are "
                             "sharded (DTensor): GradientClipping reduces norms over one of the two, not both. Use a "
                             "strategy that does only one of them.")
        if len(self._slots) != len(optimizers):
            self._slots = [Slot(i) for i in range(len(optimizers))]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for slot, optimizer in zip(self._slots, optimizers, strict=True):
            fused = all(g.get("fused") for g in optimizer.param_groups)
            method = self.skip_method
            if method == "auto":
                on_cpu = all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
                # reading a CPU scalar is a memory load, not a device sync: cheaper than copying every parameter
                method = "found_inf" if fused and scaler is None else ("sync" if on_cpu else "snapshot")
            which = f"optimizer {slot.index} ({type(optimizer).__name__})"
            if method == "found_inf" and not fused:
                raise ValueError(f"skip_method='found_inf' needs a fused optimizer, and {which} is not "
                                 f"({type(optimizer).__name__}(..., fused=True)); use skip_method='auto', "
                                 "'snapshot' or 'sync'.")
            if method == "found_inf" and scaler is not None:
                raise ValueError("skip_method='found_inf' cannot be used under fp16 AMP, whose GradScaler sets the "
                                 "optimizer's found_inf itself; use skip_method='snapshot' or 'sync'.")
            suffix = "" if len(optimizers) == 1 else f"/opt{slot.index}"
            slot.bind(optimizer, names, method, scaler, fused, suffix, groups)
            slot.weights = [i for i, p in enumerate(slot.params) if p.ndim >= 2][::-1]  # output to input
            slot.agc_skip = self._agc_excluded(slot)
            slot.since_log = 0
        self._by_optimizer = {id(s.optimizer): s for s in self._slots}
        self._apply_loaded()
        self._buffers = BufferGuard(pl_module, self._slots) if self.restore_buffers else None
        self._window_open = False
        self._fitting = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for slot in self._slots:
            slot.unbind()
        self._fitting = False

    def _agc_excluded(self, slot: Slot) -> set[int]:
        if self.agc_exclude is None:  # this optimizer's last layer: the output layer (of each network of a GAN)
            last = slot.names[-1:] or [""]
            prefix = last[0].rsplit(".", 1)[0] + "."
            return {i for i, n in enumerate(slot.names) if n.startswith(prefix)}
        return {i for i, n in enumerate(slot.names) if any(fnmatch.fnmatchcase(n, pat) for pat in self.agc_exclude)}

    def _init_state(self, slot: Slot, device: torch.device) -> None:
        groups = len(slot.params) if self.per_layer else 1
        zeros = lambda: torch.zeros(groups, device=device)  # noqa: E731
        state = {
            "history": torch.full((self.history_size if self.mode == "quantile" else 0, groups), math.nan,
                                  device=device),
            "mean": zeros(), "var": zeros(), "warm_sum": zeros(), "warm_sq": zeros(), "warm_n": zeros(),
            "skipped": torch.zeros((), dtype=torch.int64, device=device),
            "streak": torch.zeros((), dtype=torch.int64, device=device),
            "max_streak": torch.zeros((), dtype=torch.int64, device=device),
            "clipped": torch.zeros((), dtype=torch.int64, device=device),
        }
        loaded = slot.loaded or (slot.state if slot.state else None)  # a checkpoint, or statistics on another device
        if loaded is not None:
            if loaded["history"].shape != state["history"].shape:
                raise ValueError(f"the checkpointed GradientClipping history of optimizer {slot.index} has shape "
                                 f"{tuple(loaded['history'].shape)} but this run needs {tuple(state['history'].shape)}:"
                                 " resume with the same history_size and parameters, or start without the "
                                 "callback's state.")
            state.update({k: v.to(device) for k, v in loaded.items()})
            slot.loaded = None
        slot.state = state

    # ---------------------------------------------------------------- per batch: the buffers' window
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for slot in self._slots:
            slot.batch_skip = None
        if self._buffers and not self._window_open:  # the first micro-batch of an accumulation window
            self._buffers.snapshot()
            self._window_open = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not batch_steps(trainer):
            return  # the window goes on: its forward passes are undone together if its step is skipped
        self._window_open = False
        if self._buffers:
            self._buffers.restore({s.index: s.batch_skip for s in self._slots if s.batch_skip is not None})
        for slot in self._slots:
            slot.batch_skip = None

    # ---------------------------------------------------------------- per step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        slot = self._by_optimizer.get(id(optimizer))
        if slot is None:
            raise RuntimeError(f"GradientClipping was handed a {type(optimizer).__name__} that is not one of the "
                               f"{len(self._slots)} optimizers in trainer.optimizers: return every optimizer from "
                               "configure_optimizers and step it through self.optimizers().")
        present = [i for i, p in enumerate(slot.params) if p.grad is not None]
        if not present:
            return
        grads = [local(slot.params[i].grad) for i in present]
        device = grads[0].device
        if not slot.state or slot.state["skipped"].device != device:
            self._init_state(slot, device)
        if slot.scaler is not None and slot.fused:
            slot.scaler.unscale_(optimizer)  # fused optimizers unscale inside step(): we must see true gradients
        self._group = getattr(trainer.strategy, "gradient_norm_group", None)
        s = slot.state
        norms = self._norms(slot, present, grads, self.norm_type)
        total = self._global_norm(norms)
        finite = torch.isfinite(total)
        if self.per_layer:
            index = slot.present_index(present, device)
            group_norms = torch.zeros(len(slot.params), device=device).index_put_((index,), norms)
        else:
            group_norms = total.reshape(1)
        threshold = self._threshold(slot, group_norms)
        clipped, post = self._clip(slot, grads, present, norms, group_norms, threshold, total)
        self._update_statistics(slot, group_norms, threshold, finite)
        skip = ~finite
        if self.skip_spikes:
            skip = skip | (group_norms > threshold).any()
        s["skipped"] += skip
        s["streak"] = (s["streak"] + 1) * skip
        torch.maximum(s["max_streak"], s["streak"], out=s["max_streak"])
        s["clipped"] += clipped & ~skip
        slot.steps += 1
        slot.since_log += 1
        logging = is_logging_step(trainer)
        if logging and post is None:
            post = self._global_norm(self._norms(slot, present, grads, self.norm_type))
        slot.prepare_skip(present, skip)
        if logging:
            self._report(trainer, pl_module, slot, present, total, post, threshold, norms)
        elif slot.method == "sync":
            self._ladder(trainer, pl_module, slot, slot.host_streak)  # the flag is on the host already

    def _norms(self, slot: Slot, present: list[int], grads: list[Tensor], norm_type: float) -> Tensor:
        """Per-tensor norms of whole gradients: local ones, or the shards' combined over the mesh."""
        norms = tensor_norms(grads, norm_type).to(grads[0].device)
        if slot.groups is None:
            return norms
        key = ("mask", *present)
        if key not in slot.index_cache:  # built once per set of present gradients
            slot.index_cache[key] = torch.tensor([slot.sharded[i] for i in present], device=norms.device)
        return global_tensor_norms(norms, slot.index_cache[key], slot.groups, norm_type)

    def _global_norm(self, norms: Tensor) -> Tensor:
        power = norm_power(norms, self.norm_type)
        if self._group is not None and dist.is_available() and dist.is_initialized():
            op = dist.ReduceOp.MAX if self.norm_type == math.inf else dist.ReduceOp.SUM
            dist.all_reduce(power, op=op, group=self._group)  # ranks hold different parameters: add their shares
        return norm_from_power(power, self.norm_type)

    def _threshold(self, slot: Slot, group_norms: Tensor) -> Tensor:
        s = slot.state
        if self.mode == "quantile":
            # non-finite norms enter as NaN, which the quantile ignores
            s["history"][slot.steps % self.history_size] = torch.where(
                torch.isfinite(group_norms), group_norms, torch.full_like(group_norms, math.nan))
            return quantile_threshold(s["history"], self.quantile)
        if self.mode == "zscore":
            if slot.steps < self.warmup_steps:
                return torch.full_like(group_norms, math.inf)
            return zscore_threshold(s["mean"], s["var"], self.z_threshold)
        return torch.full_like(group_norms, self.threshold)

    def _update_statistics(self, slot: Slot, group_norms: Tensor, threshold: Tensor, finite: Tensor) -> None:
        if self.mode != "zscore":
            return
        s = slot.state
        ok = torch.isfinite(group_norms) & finite
        value = torch.where(ok, group_norms, torch.zeros_like(group_norms))
        if slot.steps < self.warmup_steps:
            s["warm_sum"] += value
            s["warm_sq"] += value * value
            s["warm_n"] += ok
            n = s["warm_n"].clamp(min=1)
            s["mean"] = s["warm_sum"] / n
            s["var"] = (s["warm_sq"] / n - s["mean"] ** 2).clamp(min=0)
        else:  # the moments follow the clipped norm, so a spike does not inflate the next threshold
            mean, var = ema_moments(s["mean"], s["var"], torch.minimum(value, threshold), self.ema_decay)
            s["mean"], s["var"] = torch.where(ok, mean, s["mean"]), torch.where(ok, var, s["var"])

    def _clip(self, slot, grads, present, norms, group_norms, threshold, total) -> tuple[Tensor, Optional[Tensor]]:
        """Clip in place; returns (whether anything was clipped, the post-clip global norm where it comes free)."""
        if self.mode == "value":
            peak = norms if self.norm_type == math.inf else self._norms(slot, present, grads, math.inf)
            torch._foreach_clamp_min_(grads, -self.threshold)
            torch._foreach_clamp_max_(grads, self.threshold)
            return (peak > self.threshold).any(), None
        if self.mode == "agc":
            clipped = torch.zeros((), dtype=torch.bool, device=total.device)
            for i, g in zip(present, grads, strict=True):
                if i not in slot.agc_skip:
                    coef = agc_coefficient(slot.params[i], g, self.agc_clipping, self.agc_eps)
                    clipped = clipped | (coef < 1).any()
                    g.mul_(coef)
            return clipped, None
        coef = clip_coefficient(group_norms, threshold)
        if self.per_layer:
            per_tensor = coef[slot.present_index(present, coef.device)]
            torch._foreach_mul_(grads, list(per_tensor.unbind()))
            post = self._global_norm(norms * per_tensor)
        else:
            torch._foreach_mul_(grads, coef[0])
            post = total * coef[0]
        return (coef < 1).any(), post

    # ---------------------------------------------------------------- logging and the ladder
    def _report(self, trainer, pl_module, slot, present, total, post, threshold, norms) -> None:
        s = slot.state
        values = [total, post, s["skipped"], s["streak"], s["max_streak"], s["clipped"], threshold.max()]
        if self.log_depth_profile:
            pos = {i: k for k, i in enumerate(present)}
            values.append(depth_slope(norms[[pos[i] for i in slot.weights if i in pos]]))
        flat = torch.cat([torch.stack([v.float().reshape(()) for v in values]),
                          norms.float() if self.log_layer_norms else norms.new_zeros(0)])
        host = flat.tolist()  # sync point: logging step only
        pre, post_, skipped, streak, max_streak, clipped, thr = host[:7]
        tail = slot.suffix
        metrics = {
            f"grad/norm_pre{tail}": pre,
            f"grad/norm_post{tail}": post_,
            f"grad/clip_coef{tail}": post_ / pre if pre > 0 else 1.0,
            f"grad/clipped_frac{tail}": clipped / max(slot.since_log, 1),
            f"grad/skipped_steps{tail}": skipped,
        }
        if self.mode in ("norm", "value", "quantile", "zscore") and not self.per_layer:
            metrics[f"grad/threshold{tail}"] = thr
        if self.log_depth_profile:
            metrics[f"grad/depth_slope{tail}"] = host[7]
        if self.log_layer_norms:  # parameter names are unique across optimizers: no suffix
            for i, value in zip(present, host[len(values):], strict=True):
                metrics[f"grad/norm/{slot.names[i]}"] = value
        s["clipped"].zero_()
        s["max_streak"].copy_(s["streak"])
        slot.since_log = 0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._ladder(trainer, pl_module, slot, int(max_streak), healthy=max_streak == 0 and streak == 0)

    def _ladder(self, trainer, pl_module, slot: Slot, streak: int, healthy: bool = False) -> None:
        limit = self.max_consecutive_skips
        optimizer = slot.optimizer
        if limit is None or streak < limit:
            if healthy and self.on_consecutive_skips == "restore":
                slot.healthy = {"params": [p.detach().clone() for p in slot.params],
                                "buffers": self._owned_buffers(pl_module, slot),
                                "optimizer": copy.deepcopy(optimizer.state_dict())}
                slot.restored_from_current = False
            return
        which = "" if len(self._slots) == 1 else f"optimizer {slot.index} ({type(optimizer).__name__}) "
        what = (f"GradientClipping skipped {streak} {which}optimizer steps in a row (limit "
                f"max_consecutive_skips={limit}) at global step {trainer.global_step}: the gradient norm was not "
                "finite" + (" or above the threshold (skip_spikes=True)" if self.skip_spikes else "") + ". ")
        if self.on_consecutive_skips == "raise" or slot.healthy is None or slot.restored_from_current:
            why = "" if self.on_consecutive_skips == "raise" else (
                "No healthy snapshot is left to restore. " if slot.restored_from_current or slot.healthy
                else "No healthy logging step has been seen yet to restore from. ")
            raise RuntimeError(what + why + "Lower the learning rate, check the data for NaN/inf and the loss for "
                               "log(0) or division by zero, or use a bf16/fp32 precision.")
        with torch.no_grad():
            for p, saved in zip(slot.params, slot.healthy["params"], strict=True):
                p.copy_(saved)
            for name, saved in slot.healthy["buffers"].items():
                pl_module.get_buffer(name).copy_(saved)
        optimizer.load_state_dict(slot.healthy["optimizer"])
        slot.restored_from_current = True
        for p in slot.params:  # this step's gradients belong to the weights we just threw away
            p.grad = None
        slot.pending = None
        slot.batch_skip = None  # the snapshot holds the buffers too: the batch-end restore must not undo it
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        slot.state["streak"].zero_()
        slot.state["max_streak"].zero_()
        slot.host_streak = 0

    def _owned_buffers(self, pl_module: pl.LightningModule, slot: Slot) -> dict[str, Tensor]:
        """Copies of the persistent buffers a healthy snapshot restores with this optimizer's parameters."""
        owned = {id(t) for group in (self._buffers.groups if self._buffers else [])
                 for t in group.tensors if group.owner in (slot.index, BufferGuard.SHARED)}
        if len(self._slots) == 1:
            owned = None  # one optimizer owns every buffer
        return {n: b.detach().clone() for n, b in pl_module.named_buffers()
                if owned is None or id(local(b)) in owned}

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``steps`` and ``tensors`` of the first optimizer (the single-optimizer format), then the others'."""
        entries = [{"steps": s.steps, "tensors": {k: v.detach().cpu() for k, v in s.state.items()} if s.state
                    else (s.loaded or {})} for s in self._slots] or (self._loaded or [{"steps": 0, "tensors": {}}])
        return {**entries[0], "optimizers": entries[1:]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        entries = [state_dict, *state_dict.get("optimizers", [])]
        self._loaded = [{"steps": int(e["steps"]), "tensors": dict(e["tensors"])} for e in entries]
        if self._fitting:  # restored after on_fit_start (strategies that restore after setup)
            self._apply_loaded()

    def _apply_loaded(self) -> None:
        if self._loaded is None:
            return
        if len(self._loaded) != len(self._slots):
            raise ValueError(f"the checkpointed GradientClipping state holds {len(self._loaded)} optimizer(s) but "
                             f"this run has {len(self._slots)}: resume with the same configure_optimizers, or "
                             "start without the callback's state.")
        for slot, entry in zip(self._slots, self._loaded, strict=True):
            slot.steps = entry["steps"]
            slot.state, slot.loaded = {}, (entry["tensors"] or None)
        self._loaded = None

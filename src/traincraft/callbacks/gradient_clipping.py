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

from traincraft._steps import is_logging_step
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


class GradientClipping(Callback):
    """Clip gradients once per optimizer step, skip steps whose gradient is not finite, and log what happened.

    Runs in ``on_before_optimizer_step``: after gradient accumulation and after AMP unscaling, so it sees the
    gradients the optimizer is about to apply. Under manual optimization, call ``opt = self.optimizers()`` and
    ``self.manual_backward(loss)``, then ``opt.step()`` on that LightningOptimizer: Lightning calls the hook inside
    it (never step the raw ``torch.optim`` optimizer, which bypasses the hook and AMP unscaling).

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
    by the same global norm. Under data parallelism gradients are already averaged: nothing is reduced.

    The guard ladder: a step whose gradient norm is not finite is always skipped: weights, momentum buffers, Adam
    moments and step counts stay bit-identical. With ``skip_spikes``, a step whose norm is above the threshold is
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

    Logged at the logging interval (one host copy per log):

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
        log_layer_norms: bool = False,
        log_depth_profile: bool = False,
    ) -> None:
        if mode not in ("norm", "value", "agc", "quantile", "zscore"):
            raise ValueError(f"mode={mode!r} is not one of 'norm', 'value', 'agc', 'quantile', 'zscore'.")
        if not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}.")
        if not (norm_type == math.inf or norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}; 2.0 is the usual L2 norm.")
        if per_layer and mode in ("value", "agc"):
            raise ValueError(f"per_layer=True has no meaning for mode={mode!r}, which already acts per entry/unit; "
                             "drop per_layer.")
        if skip_spikes and mode == "agc":
            raise ValueError("skip_spikes=True needs a norm threshold, and mode='agc' has none per step; use "
                             "mode='norm', 'quantile' or 'zscore', or set skip_spikes=False.")
        if agc_clipping <= 0 or agc_eps < 0:
            raise ValueError(f"agc_clipping must be > 0 and agc_eps >= 0, got {agc_clipping}, {agc_eps}; "
                             "Brock et al. use 0.01 and 1e-3.")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}; AutoClip uses 0.1.")
        if history_size < 1 or warmup_steps < 0:
            raise ValueError(f"history_size must be >= 1 and warmup_steps >= 0, got {history_size}, {warmup_steps}.")
        if not (z_threshold > 0 and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"need z_threshold > 0 and 0 <= ema_decay < 1, got {z_threshold}, {ema_decay}; "
                             "ZClip uses 2.5 and 0.97.")
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}.")
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
        self.log_layer_norms, self.log_depth_profile = log_layer_norms, log_depth_profile
        self.steps = 0  # optimizer steps seen: host-known, so step-count decisions need no sync
        self._state: dict[str, Tensor] = {}  # device statistics (see _init_state)
        self._loaded: Optional[dict[str, Any]] = None
        self._since_log = 0
        self._host_streak = 0
        self._pending: Optional[dict[str, Any]] = None  # what the optimizer's post-step hook must undo
        self._hook: Any = None
        self._snapshot_key: tuple[int, ...] = ()
        self._snapshot: list[Tensor] = []
        self._healthy: Optional[tuple[dict, dict]] = None
        self._restored_from_current = False

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
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradientClipping supports one optimizer, the module configured "
                             f"{len(trainer.optimizers)}; clip the others in your own optimizer_step.")
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._names = [names.get(id(p), f"param{i}") for i, p in enumerate(self._params)]
        self._weights = [i for i, p in enumerate(self._params) if p.ndim >= 2][::-1]  # output to input
        self._agc_skip = self._agc_excluded(list(names.values()))
        fused = all(g.get("fused") for g in optimizer.param_groups)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        method = self.skip_method
        if method == "auto":
            on_cpu = all(p.device.type == "cpu" for p in self._params)
            # reading a CPU scalar is a memory load, not a device sync: cheaper than copying every parameter
            method = "found_inf" if fused and scaler is None else ("sync" if on_cpu else "snapshot")
        if method == "found_inf" and not fused:
            raise ValueError(f"skip_method='found_inf' needs a fused optimizer ({type(optimizer).__name__}(..., "
                             "fused=True)); use skip_method='auto', 'snapshot' or 'sync'.")
        if method == "found_inf" and scaler is not None:
            raise ValueError("skip_method='found_inf' cannot be used under fp16 AMP, whose GradScaler sets the "
                             "optimizer's found_inf itself; use skip_method='snapshot' or 'sync'.")
        self._method, self._scaler, self._fused = method, scaler, fused
        self._hook = optimizer.register_step_post_hook(self._after_step)  # runs right after every step()
        self._since_log = 0
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = None

    def _agc_excluded(self, names: list[str]) -> set[int]:
        if self.agc_exclude is None:
            last = [n for n in self._names if n in names][-1:] or [""]
            prefix = last[0].rsplit(".", 1)[0] + "."
            return {i for i, n in enumerate(self._names) if n.startswith(prefix)}
        return {i for i, n in enumerate(self._names) if any(fnmatch.fnmatchcase(n, pat) for pat in self.agc_exclude)}

    def _init_state(self, device: torch.device) -> None:
        groups = len(self._params) if self.per_layer else 1
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
        if self._loaded is not None:
            loaded = self._loaded["tensors"]
            if loaded["history"].shape != state["history"].shape:
                raise ValueError(f"the checkpointed GradientClipping history has shape {tuple(loaded['history'].shape)}"
                                 f" but this run needs {tuple(state['history'].shape)}: resume with the same "
                                 "history_size and parameters, or start without the callback's state.")
            state.update({k: v.to(device) for k, v in loaded.items()})
            self._loaded = None
        self._state = state

    # ---------------------------------------------------------------- per step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return
        grads = [self._params[i].grad for i in present]
        device = grads[0].device
        if not self._state or self._state["skipped"].device != device:
            self._init_state(device)
        if self._scaler is not None and self._fused:
            self._scaler.unscale_(optimizer)  # fused optimizers unscale inside step(): we must see true gradients
        self._group = getattr(trainer.strategy, "gradient_norm_group", None)
        s = self._state
        norms = tensor_norms(grads, self.norm_type).to(device)
        total = self._global_norm(norms)
        finite = torch.isfinite(total)
        if self.per_layer:
            index = self._index(present, device)
            group_norms = torch.zeros(len(self._params), device=device).index_put_((index,), norms)
        else:
            group_norms = total.reshape(1)
        threshold = self._threshold(group_norms)
        clipped, post = self._clip(grads, present, norms, group_norms, threshold, total)
        self._update_statistics(group_norms, threshold, finite)
        skip = ~finite
        if self.skip_spikes:
            skip = skip | (group_norms > threshold).any()
        s["skipped"] += skip
        s["streak"] = (s["streak"] + 1) * skip
        torch.maximum(s["max_streak"], s["streak"], out=s["max_streak"])
        s["clipped"] += clipped & ~skip
        self.steps += 1
        self._since_log += 1
        logging = is_logging_step(trainer)
        if logging and post is None:
            post = self._global_norm(tensor_norms(grads, self.norm_type).to(device))
        self._skip(optimizer, present, skip)
        if logging:
            self._report(trainer, pl_module, optimizer, present, total, post, threshold, norms)
        elif self._method == "sync":
            self._ladder(trainer, pl_module, optimizer, self._host_streak)  # the flag is on the host already

    def _index(self, present: list[int], device: torch.device) -> Tensor:
        key = tuple(present)
        if key not in self._index_cache:  # built once: a host list copied to the device every step would cost
            self._index_cache[key] = torch.tensor(present, device=device)
        return self._index_cache[key]

    def _global_norm(self, norms: Tensor) -> Tensor:
        power = norm_power(norms, self.norm_type)
        if self._group is not None and dist.is_available() and dist.is_initialized():
            op = dist.ReduceOp.MAX if self.norm_type == math.inf else dist.ReduceOp.SUM
            dist.all_reduce(power, op=op, group=self._group)  # ranks hold different parameters: add their shares
        return norm_from_power(power, self.norm_type)

    def _threshold(self, group_norms: Tensor) -> Tensor:
        s = self._state
        if self.mode == "quantile":
            # non-finite norms enter as NaN, which the quantile ignores
            s["history"][self.steps % self.history_size] = torch.where(
                torch.isfinite(group_norms), group_norms, torch.full_like(group_norms, math.nan))
            return quantile_threshold(s["history"], self.quantile)
        if self.mode == "zscore":
            if self.steps < self.warmup_steps:
                return torch.full_like(group_norms, math.inf)
            return zscore_threshold(s["mean"], s["var"], self.z_threshold)
        return torch.full_like(group_norms, self.threshold)

    def _update_statistics(self, group_norms: Tensor, threshold: Tensor, finite: Tensor) -> None:
        if self.mode != "zscore":
            return
        s = self._state
        ok = torch.isfinite(group_norms) & finite
        value = torch.where(ok, group_norms, torch.zeros_like(group_norms))
        if self.steps < self.warmup_steps:
            s["warm_sum"] += value
            s["warm_sq"] += value * value
            s["warm_n"] += ok
            n = s["warm_n"].clamp(min=1)
            s["mean"] = s["warm_sum"] / n
            s["var"] = (s["warm_sq"] / n - s["mean"] ** 2).clamp(min=0)
        else:  # the moments follow the clipped norm, so a spike does not inflate the next threshold
            mean, var = ema_moments(s["mean"], s["var"], torch.minimum(value, threshold), self.ema_decay)
            s["mean"], s["var"] = torch.where(ok, mean, s["mean"]), torch.where(ok, var, s["var"])

    def _clip(self, grads, present, norms, group_norms, threshold, total) -> tuple[Tensor, Optional[Tensor]]:
        """Clip in place; returns (whether anything was clipped, the post-clip global norm where it comes free)."""
        if self.mode == "value":
            peak = norms if self.norm_type == math.inf else tensor_norms(grads, math.inf).to(total.device)
            torch._foreach_clamp_min_(grads, -self.threshold)
            torch._foreach_clamp_max_(grads, self.threshold)
            return (peak > self.threshold).any(), None
        if self.mode == "agc":
            clipped = torch.zeros((), dtype=torch.bool, device=total.device)
            for i, g in zip(present, grads, strict=True):
                if i not in self._agc_skip:
                    coef = agc_coefficient(self._params[i], g, self.agc_clipping, self.agc_eps)
                    clipped = clipped | (coef < 1).any()
                    g.mul_(coef)
            return clipped, None
        coef = clip_coefficient(group_norms, threshold)
        if self.per_layer:
            per_tensor = coef[self._index(present, coef.device)]
            torch._foreach_mul_(grads, list(per_tensor.unbind()))
            post = self._global_norm(norms * per_tensor)
        else:
            torch._foreach_mul_(grads, coef[0])
            post = total * coef[0]
        return (coef < 1).any(), post

    # ---------------------------------------------------------------- skipping
    def _skip(self, optimizer: Any, present: list[int], skip: Tensor) -> None:
        if self._method == "sync":
            skipped = bool(skip.item())  # sync point: every step, chosen by skip_method="sync"
            self._host_streak = self._host_streak + 1 if skipped else 0
            if skipped:
                for i in present:
                    self._params[i].grad = None  # torch optimizers leave gradient-less parameters untouched
            return
        params = [self._params[i] for i in present]
        pending: dict[str, Any] = {"skip": skip, "params": params,
                                   "had_state": [bool(optimizer.state.get(p)) for p in params]}
        if self._method == "found_inf":
            optimizer.found_inf = skip.float()  # fused kernels skip the whole update when this is nonzero
        else:
            live = [t.detach() for t in params] + [
                t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
            pending["live"], pending["saved"] = live, self._buffers(live)
            torch._foreach_copy_(pending["saved"], live)
        self._pending = pending

    def _buffers(self, live: list[Tensor]) -> list[Tensor]:
        """Snapshot buffers, allocated once per set of tensors (the optimizer creates its state once)."""
        key = tuple(id(t) for t in live)
        if self._snapshot_key != key:
            self._snapshot_key, self._snapshot = key, [torch.empty_like(t) for t in live]
        return self._snapshot

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        skip = pending["skip"]
        if self._method == "found_inf":
            del optimizer.found_inf
        else:
            flags = {skip.device: skip}
            with torch.no_grad():
                for t, saved in zip(pending["live"], pending["saved"], strict=True):
                    if t.device not in flags:
                        # sync point: host-side state (the step counts of non-fused, non-capturable Adam on a GPU)
                        # can only be restored with the flag on the host; fused=True or capturable=True avoid it
                        flags[t.device] = skip.to(t.device)
                    torch.where(flags[t.device], saved, t, out=t)
        # A skipped step must not leave state behind that it created: fused SGD even leaves an uninitialized
        # momentum buffer (torch.empty_like) when found_inf is set on its first step.
        created = [p for p, had in zip(pending["params"], pending["had_state"], strict=True)
                   if not had and optimizer.state.get(p)]
        if created and skip.item():  # sync point: only the step at which the optimizer creates its state
            for p in created:
                del optimizer.state[p]

    # ---------------------------------------------------------------- logging and the ladder
    def _report(self, trainer, pl_module, optimizer, present, total, post, threshold, norms) -> None:
        s = self._state
        values = [total, post, s["skipped"], s["streak"], s["max_streak"], s["clipped"], threshold.max()]
        if self.log_depth_profile:
            pos = {i: k for k, i in enumerate(present)}
            values.append(depth_slope(norms[[pos[i] for i in self._weights if i in pos]]))
        flat = torch.cat([torch.stack([v.float().reshape(()) for v in values]),
                          norms.float() if self.log_layer_norms else norms.new_zeros(0)])
        host = flat.tolist()  # sync point: logging step only
        pre, post_, skipped, streak, max_streak, clipped, thr = host[:7]
        metrics = {
            "grad/norm_pre": pre,
            "grad/norm_post": post_,
            "grad/clip_coef": post_ / pre if pre > 0 else 1.0,
            "grad/clipped_frac": clipped / max(self._since_log, 1),
            "grad/skipped_steps": skipped,
        }
        if self.mode in ("norm", "value", "quantile", "zscore") and not self.per_layer:
            metrics["grad/threshold"] = thr
        if self.log_depth_profile:
            metrics["grad/depth_slope"] = host[7]
        if self.log_layer_norms:
            for i, value in zip(present, host[len(values):], strict=True):
                metrics[f"grad/norm/{self._names[i]}"] = value
        s["clipped"].zero_()
        s["max_streak"].copy_(s["streak"])
        self._since_log = 0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._ladder(trainer, pl_module, optimizer, int(max_streak), healthy=max_streak == 0 and streak == 0)

    def _ladder(self, trainer, pl_module, optimizer, streak: int, healthy: bool = False) -> None:
        limit = self.max_consecutive_skips
        if limit is None or streak < limit:
            if healthy and self.on_consecutive_skips == "restore":
                self._healthy = (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(optimizer.state_dict()))
                self._restored_from_current = False
            return
        what = (f"GradientClipping skipped {streak} optimizer steps in a row (limit max_consecutive_skips={limit}) "
                f"at global step {trainer.global_step}: the gradient norm was not finite"
                + (" or above the threshold (skip_spikes=True)" if self.skip_spikes else "") + ". ")
        if self.on_consecutive_skips == "raise" or self._healthy is None or self._restored_from_current:
            why = "" if self.on_consecutive_skips == "raise" else (
                "No healthy snapshot is left to restore. " if self._restored_from_current or self._healthy
                else "No healthy logging step has been seen yet to restore from. ")
            raise RuntimeError(what + why + "Lower the learning rate, check the data for NaN/inf and the loss for "
                               "log(0) or division by zero, or use a bf16/fp32 precision.")
        pl_module.load_state_dict(self._healthy[0])
        optimizer.load_state_dict(self._healthy[1])
        self._restored_from_current = True
        for p in self._params:  # this step's gradients belong to the weights we just threw away
            p.grad = None
        self._pending = None
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        self._state["streak"].zero_()
        self._state["max_streak"].zero_()
        self._host_streak = 0

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        tensors = {k: v.detach().cpu() for k, v in self._state.items()} if self._state else (
            self._loaded["tensors"] if self._loaded else {})
        return {"steps": self.steps, "tensors": tensors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self._loaded = {"tensors": dict(state_dict["tensors"])} if state_dict["tensors"] else None
        self._state = {}

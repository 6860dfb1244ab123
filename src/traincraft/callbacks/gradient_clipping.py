"""GradientClipping: clip by norm, value, AGC, quantile or z-score; skip non-finite steps; log gradient health."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft._guard import local
from traincraft._steps import is_logging_step
from traincraft.callbacks._clip_config import agc_excluded, check_arguments, check_optimizers
from traincraft.callbacks._clip_modes import ClipModes
from traincraft.callbacks._clip_state import Slot
from traincraft.callbacks._step_skipping import StepSkipping
from traincraft.metrics.grad_norms import depth_slope

Mode = Literal["norm", "value", "agc", "quantile", "zscore"]


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

    # GradientClipping skips non-finite steps and restores the module's buffers itself: ImageClassifier's guard
    # (which looks for this attribute, as modules may not import callbacks) then only records them
    skips_nonfinite_steps = True

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
        check_arguments(locals())
        self.mode, self.threshold, self.norm_type, self.per_layer = mode, float(threshold), float(norm_type), per_layer
        self.agc_clipping, self.agc_eps, self.agc_exclude = agc_clipping, agc_eps, agc_exclude
        self.quantile, self.history_size = quantile, history_size
        self.z_threshold, self.ema_decay, self.warmup_steps = z_threshold, ema_decay, warmup_steps
        self.skip_spikes, self.max_consecutive_skips = skip_spikes, max_consecutive_skips
        self.on_consecutive_skips, self.skip_method = on_consecutive_skips, skip_method
        self.restore_buffers = restore_buffers
        self.log_layer_norms, self.log_depth_profile = log_layer_norms, log_depth_profile
        self._modes = ClipModes(mode, float(threshold), float(norm_type), per_layer, agc_clipping, agc_eps, quantile,
                                history_size, z_threshold, ema_decay, warmup_steps)
        self._skipping = StepSkipping(skip_method, restore_buffers, max_consecutive_skips, on_consecutive_skips,
                                      skip_spikes)
        self._slots: list[Slot] = []  # one per optimizer, kept across fits (their statistics are training state)
        self._by_optimizer: dict[int, Slot] = {}
        self._loaded: Optional[list[dict[str, Any]]] = None
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
        groups = check_optimizers(optimizers, self.mode, trainer.strategy, type(self).__name__)
        if len(self._slots) != len(optimizers):
            self._slots = [Slot(i) for i in range(len(optimizers))]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for slot, optimizer in zip(self._slots, optimizers, strict=True):
            slot.bind(optimizer, names, "" if len(optimizers) == 1 else f"/opt{slot.index}", groups)
            slot.agc_skip = agc_excluded(slot.names, self.agc_exclude)
        self._skipping.bind(trainer, pl_module, self._slots)
        self._by_optimizer = {id(s.optimizer): s for s in self._slots}
        self._apply_loaded()
        self._fitting = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._skipping.unbind()
        self._fitting = False

    # ---------------------------------------------------------------- per batch: the buffers' window
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._skipping.batch_start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._skipping.batch_end(trainer)

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
            history = self.history_size if self.mode == "quantile" else 0
            slot.init_state(device, len(slot.params) if self.per_layer else 1, history)
        if slot.scaler is not None and slot.fused:
            slot.scaler.unscale_(optimizer)  # fused optimizers unscale inside step(): we must see true gradients
        modes = self._modes
        modes.group = getattr(trainer.strategy, "gradient_norm_group", None)
        s = slot.state
        norms = modes.norms(slot, present, grads, self.norm_type)
        total = modes.global_norm(norms)
        finite = torch.isfinite(total)
        if self.per_layer:
            index = slot.present_index(present, device)
            group_norms = torch.zeros(len(slot.params), device=device).index_put_((index,), norms)
        else:
            group_norms = total.reshape(1)
        threshold = modes.threshold_for(slot, group_norms)
        clipped, post = modes.clip(slot, grads, present, norms, group_norms, threshold, total)
        modes.update_statistics(slot, group_norms, threshold, finite)
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
            post = modes.global_norm(modes.norms(slot, present, grads, self.norm_type))
        self._skipping.prepare(slot, present, skip)
        if logging:
            self._report(trainer, pl_module, slot, present, total, post, threshold, norms)
        elif slot.method == "sync":
            self._skipping.ladder(trainer, pl_module, slot, slot.host_streak)  # the flag is on the host already

    # ---------------------------------------------------------------- logging
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
        self._skipping.ladder(trainer, pl_module, slot, int(max_streak), healthy=max_streak == 0 and streak == 0)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``steps`` and ``tensors`` of the first optimizer (the single-optimizer format), then the others'."""
        entries = [s.entry() for s in self._slots] or (self._loaded or [{"steps": 0, "tensors": {}}])
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

"""GradientClipping's five clip modes: per-tensor and global norms, thresholds and their statistics, the clip itself.

The maths are the pure functions of :mod:`traincraft.metrics.grad_norms`; this class applies them to one
optimizer's gradients in place and keeps the modes' statistics in that optimizer's ``Slot``, on the device.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from traincraft.callbacks._clip_state import Slot, global_tensor_norms
from traincraft.metrics import grad_norms as gn
from traincraft.strategies._collectives import all_reduce_


class ClipModes:
    """The clip mode of one GradientClipping callback (see its docstring for the arguments)."""

    def __init__(self, mode: str, threshold: float, norm_type: float, per_layer: bool, agc_clipping: float,
                 agc_eps: float, quantile: float, history_size: int, z_threshold: float, ema_decay: float,
                 warmup_steps: int) -> None:
        self.mode, self.threshold, self.norm_type, self.per_layer = mode, threshold, norm_type, per_layer
        self.agc_clipping, self.agc_eps = agc_clipping, agc_eps
        self.quantile, self.history_size = quantile, history_size
        self.z_threshold, self.ema_decay, self.warmup_steps = z_threshold, ema_decay, warmup_steps
        self.group: Any = None  # the strategy's gradient_norm_group: ranks that hold different parameters

    def norms(self, slot: Slot, present: list[int], grads: list[Tensor], norm_type: float) -> Tensor:
        """Per-tensor norms of whole gradients: local ones, or the shards' combined over the mesh."""
        norms = gn.tensor_norms(grads, norm_type).to(grads[0].device)
        if slot.groups is None:
            return norms
        key = ("mask", *present)
        if key not in slot.index_cache:  # built once per set of present gradients
            slot.index_cache[key] = torch.tensor([slot.sharded[i] for i in present], device=norms.device)
        return global_tensor_norms(norms, slot.index_cache[key], slot.groups, norm_type)

    def global_norm(self, norms: Tensor) -> Tensor:
        power = gn.norm_power(norms, self.norm_type)
        # ranks of the gradient_norm_group hold different parameters: add their shares (the max for inf)
        all_reduce_(power, "max" if self.norm_type == math.inf else "sum", self.group)
        return gn.norm_from_power(power, self.norm_type)

    def threshold_for(self, slot: Slot, group_norms: Tensor) -> Tensor:
        """This step's threshold per group (one group, or one per tensor with per_layer)."""
        s = slot.state
        if self.mode == "quantile":
            # non-finite norms enter as NaN, which the quantile ignores
            s["history"][slot.steps % self.history_size] = torch.where(
                torch.isfinite(group_norms), group_norms, torch.full_like(group_norms, math.nan))
            return gn.quantile_threshold(s["history"], self.quantile)
        if self.mode == "zscore":
            if slot.steps < self.warmup_steps:
                return torch.full_like(group_norms, math.inf)
            return gn.zscore_threshold(s["mean"], s["var"], self.z_threshold)
        return torch.full_like(group_norms, self.threshold)

    def update_statistics(self, slot: Slot, group_norms: Tensor, threshold: Tensor, finite: Tensor) -> None:
        if self.mode != "zscore":
            return
        s = slot.state
        ok = torch.isfinite(group_norms) & finite
        value = torch.where(ok, group_norms, torch.zeros_like(group_norms))
        if slot.steps < self.warmup_steps:
            s["warm_sum"] += value
            s["warm_sq"] += value * value
            s["warm_n"] += ok
            s["mean"], s["var"] = gn.warmup_moments(s["warm_sum"], s["warm_sq"], s["warm_n"])
        else:  # the moments follow the clipped norm, so a spike does not inflate the next threshold
            mean, var = gn.ema_moments(s["mean"], s["var"], torch.minimum(value, threshold), self.ema_decay)
            s["mean"], s["var"] = torch.where(ok, mean, s["mean"]), torch.where(ok, var, s["var"])

    def clip(self, slot, grads, present, norms, group_norms, threshold, total) -> tuple[Tensor, Optional[Tensor]]:
        """Clip in place; returns (whether anything was clipped, the post-clip global norm where it comes free)."""
        if self.mode == "value":
            peak = norms if self.norm_type == math.inf else self.norms(slot, present, grads, math.inf)
            torch._foreach_clamp_min_(grads, -self.threshold)
            torch._foreach_clamp_max_(grads, self.threshold)
            return (peak > self.threshold).any(), None
        if self.mode == "agc":
            clipped = torch.zeros((), dtype=torch.bool, device=total.device)
            for i, g in zip(present, grads, strict=True):
                if i not in slot.agc_skip:
                    coef = gn.agc_coefficient(slot.params[i], g, self.agc_clipping, self.agc_eps)
                    clipped = clipped | (coef < 1).any()
                    g.mul_(coef)
            return clipped, None
        coef = gn.clip_coefficient(group_norms, threshold)
        if self.per_layer:
            per_tensor = coef[slot.present_index(present, coef.device)]
            torch._foreach_mul_(grads, list(per_tensor.unbind()))
            post = self.global_norm(norms * per_tensor)
        else:
            torch._foreach_mul_(grads, coef[0])
            post = total * coef[0]
        return (coef < 1).any(), post

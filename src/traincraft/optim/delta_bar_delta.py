"""Jacobs' delta-bar-delta: a learning rate per weight, up additively on a steady sign, down multiplicatively on a flip."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer


class DeltaBarDelta(Optimizer):
    """Delta-bar-delta (Jacobs 1988, "Increased rates of convergence through learning rate adaptation").

    Each weight i has its own rate ε_i. With δ = ∂L/∂w_i and δ̄ an exponential average of past gradients,

    * ε_i ← ε_i + κ·lr   if δ̄(t-1)·δ(t) > 0 (the gradient kept its sign: a steady direction, grow additively),
    * ε_i ← ε_i·(1 - φ)   if δ̄(t-1)·δ(t) < 0 (it flipped: the weight oscillates, shrink multiplicatively),
    * δ̄(t) = (1 - θ)·δ(t) + θ·δ̄(t-1), then w_i ← w_i - ε_i·δ(t) with the updated rate.

    The rates are kept as gains relative to the group's ``lr`` (ε_i = lr·gain_i, gains start at 1), so schedulers,
    Lightning's ``LearningRateMonitor`` and :class:`~traincraft.callbacks.lr_governor.LearningRateGovernor` act on
    ``lr`` as for any optimizer; with a constant ``lr`` this is exactly Jacobs' rule with increment κ·lr.
    From YAML: ``optimizer: {class_path: traincraft.optim.DeltaBarDelta, init_args: {lr: 0.05}}``.

    Args:
        params: parameters or parameter groups.
        lr: the initial per-weight rate (and the unit of ``kappa``).
        kappa: additive growth of a weight's gain per step of agreeing signs, ``>= 0``.
        phi: fraction by which a gain shrinks on a sign flip, in ``[0, 1)``.
        theta: averaging constant of δ̄, in ``[0, 1)``.
        weight_decay: L2 penalty added to the gradient, ``>= 0``.
        max_gain: upper bound on each gain (``None``: unbounded, as in Jacobs).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = DeltaBarDelta([w], lr=0.1, kappa=0.5, phi=0.5)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (w ** 2).sum().backward()
        ...     _ = opt.step()
        >>> opt.state[w]["gain"].tolist()  # signs held: 1 -> 1 (no history yet) -> 1.5 -> 2.0
        [2.0, 2.0]
    """

    def __init__(
        self,
        params: Union[Iterable[Tensor], Iterable[dict[str, Any]]],
        lr: float = 0.01,
        kappa: float = 0.05,
        phi: float = 0.1,
        theta: float = 0.7,
        weight_decay: float = 0.0,
        max_gain: Optional[float] = None,
    ) -> None:
        checks = (
            ("lr", lr, 0.0 < lr < math.inf, "> 0"),
            ("kappa", kappa, 0.0 <= kappa < math.inf, ">= 0"),
            ("phi", phi, 0.0 <= phi < 1.0, "in [0, 1)"),
            ("theta", theta, 0.0 <= theta < 1.0, "in [0, 1)"),
            ("weight_decay", weight_decay, 0.0 <= weight_decay < math.inf, ">= 0"),
            ("max_gain", max_gain, max_gain is None or 0.0 < max_gain < math.inf, "None or > 0"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"DeltaBarDelta: {name} must be {allowed}; got {value!r}.")
        defaults = dict(lr=lr, kappa=kappa, phi=phi, theta=theta, weight_decay=weight_decay, max_gain=max_gain)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, kappa, phi, theta = group["lr"], group["kappa"], group["phi"], group["theta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DeltaBarDelta does not support sparse gradients; use dense embeddings.")
                grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["gain"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["delta_bar"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                gain, delta_bar = state["gain"], state["delta_bar"]
                agreement = delta_bar * grad
                # one fused select per weight; no branch on tensor values (no host sync)
                gain.copy_(torch.where(agreement > 0, gain + kappa, torch.where(agreement < 0, gain * (1 - phi), gain)))
                if group["max_gain"] is not None:
                    gain.clamp_(max=group["max_gain"])
                delta_bar.mul_(theta).add_(grad, alpha=1 - theta)
                p.addcmul_(gain, grad, value=-lr)
        return loss

"""Curvature of the loss: Hessian-vector products, both ends of the spectrum, trace, and stability thresholds.

Along a direction of curvature h the best learning rate is 1/h and gradient descent diverges above 2/h; the
largest such h is λ_max, the largest *algebraic* eigenvalue of the Hessian H ("sharpness"), which :func:`lanczos`
finds together with λ_min (power iteration finds the largest magnitude, often a negative eigenvalue off a minimum).
H is never formed: every function here reaches it through Hessian-vector products (double backward, Pearlmutter
1994), on flat vectors that concatenate all parameters. Nothing is copied to the host. The products live in
:mod:`traincraft.metrics.hessian_vector`, power iteration and Lanczos in :mod:`traincraft.metrics.spectrum`; both
are importable from here as before. This module keeps the trace, the thresholds and the preconditioned operator.

Stability thresholds (the value of η·λ at which the iteration on a quadratic stops converging):

================================ ======================== =====================================================
optimizer                        threshold on η·λ         source
================================ ======================== =====================================================
gradient descent                 2                        classical
heavy-ball momentum β            2 + 2β                   Cohen et al. 2021, appendix (Polyak momentum)
Nesterov momentum β              (2 + 2β) / (1 + 2β)      Cohen et al. 2021, appendix
Adam/AdamW (β₁)                  (2 + 2β₁) / (1 - β₁)     Cohen et al. 2022 (38 for β₁ = 0.9), on P⁻¹H
RMSprop (momentum m), Adagrad    2 + 2m, 2                the same analysis, preconditioned
================================ ======================== =====================================================

For the adaptive optimizers the curvature is the *preconditioned* sharpness λ_max(P⁻¹H) with
P = diag(√v̂ + ε) from the optimizer's second-moment state (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"); this module computes it as λ_max(D^½ H D^½), D = diag(η/(√v̂ + ε)), which has the same
eigenvalues as η·P⁻¹H and keeps the operator symmetric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

# the products and the spectrum live in their own modules; their names stay importable from here
from traincraft.metrics.hessian_vector import (  # noqa: F401
    DoubleBackwardError,
    Operator,
    flatten,
    hessian_vector_operator,
    module_without_double_backward,
    params_of,
)
from traincraft.metrics.spectrum import (  # noqa: F401
    ExtremeEigenpairs,
    extreme_eigenpairs,
    lanczos,
    power_iteration,
)

_TINY = 1e-30


def hutchinson_trace(operator: Operator, size: int, samples: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """Unbiased estimate of tr(H) as the mean of zᵀHz over Rademacher vectors z (Hutchinson 1989).

    Example:
        >>> D = torch.tensor([1.0, 2.0, 3.0])
        >>> hutchinson_trace(lambda v: D * v, 3, samples=1)  # exact for a diagonal operator
        tensor(6.)
    """
    if samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}. Pass e.g. 10 (more: a smaller variance).")
    total = torch.zeros((), device=device)
    for _ in range(samples):
        z = torch.randint(0, 2, (size,), generator=generator, device=device).float() * 2 - 1
        total = total + torch.dot(z, operator(z))
    return total / samples


def directional_curvature(operator: Operator, direction: Tensor) -> Tensor:
    """gᵀHg / ‖g‖²: the curvature along ``direction`` (the gradient: the one a gradient step actually takes).

    It costs one product and bounds λ_max from below, so it rises first when the rate nears 2/λ.

    Example:
        >>> directional_curvature(lambda v: torch.tensor([2.0, 8.0]) * v, torch.tensor([1.0, 1.0]))
        tensor(5.)
    """
    return torch.dot(direction, operator(direction)) / torch.dot(direction, direction).clamp_min(_TINY)


def stability_threshold(optimizer: Optimizer) -> Optional[float]:
    """The value of η·λ (preconditioned for adaptive optimizers) above which ``optimizer`` diverges on a quadratic.

    ``None`` for optimizers without a known threshold. With several parameter groups, the smallest threshold.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)), stability_threshold(torch.optim.Adam(p))
        (3.8, 38.0)
    """
    values = [_group_threshold(optimizer, group) for group in optimizer.param_groups]
    if any(v is None for v in values):
        return None
    return round(min(values), 12)


def _group_threshold(optimizer: Optimizer, group: dict) -> Optional[float]:
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if group.get("nesterov", False):
            return (2 + 2 * beta) / (1 + 2 * beta)
        return 2 + 2 * beta
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / (1 - beta1)
    if isinstance(optimizer, torch.optim.RMSprop):
        return 2 + 2 * float(group.get("momentum", 0.0))
    if isinstance(optimizer, torch.optim.Adagrad):
        return 2.0
    return None


def is_preconditioned(optimizer: Optimizer) -> bool:
    """Whether the optimizer divides by a second-moment estimate (then sharpness means λ_max(P⁻¹H))."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad))


def effective_rate_diagonal(optimizer: Optimizer, params: Sequence[Tensor]) -> Optional[Tensor]:
    """Flat per-weight step size D of one optimizer step on the gradient, for ``params`` in that order.

    η·(1-dampening) for SGD, η/(√v̂ + ε) for Adam/AdamW (η(1-β₁) folded into the threshold instead),
    η/(√v + ε) for RMSprop, η/(√Σg² + ε) for Adagrad; weights the optimizer does not hold get 0. ``None`` for an
    unknown optimizer. Adaptive optimizers without state yet (before their first step) get ``None`` too.
    """
    if _group_threshold(optimizer, optimizer.param_groups[0]) is None:
        return None
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for p in params:
        group = owner.get(id(p))
        if group is None:
            pieces.append(torch.zeros(p.numel(), device=p.device))
            continue
        lr = float(group["lr"])
        if isinstance(optimizer, torch.optim.SGD):
            pieces.append(torch.full((p.numel(),), lr * (1 - float(group.get("dampening", 0.0))), device=p.device))
            continue
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            second = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
            if second is None:
                return None
            beta2 = float(group["betas"][1])
            correction = 1 - beta2 ** torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)
            denom = (second.float() / correction).sqrt() + float(group["eps"])
        elif isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                return None
            denom = state["square_avg"].float().sqrt() + float(group["eps"])
        else:  # Adagrad
            if "sum" not in state:
                return None
            decay = 1 + (torch.as_tensor(state["step"], dtype=torch.float32, device=p.device) - 1) * group["lr_decay"]
            lr = lr / decay
            denom = state["sum"].float().sqrt() + float(group["eps"])
        pieces.append((lr / denom).reshape(-1))
    return torch.cat(pieces)


def scaled_operator(operator: Operator, diagonal: Tensor) -> Operator:
    """``v ↦ D^½ H D^½ v``: symmetric, with the eigenvalues of D·H (the step's own curvature, η·λ)."""
    root = diagonal.clamp_min(0).sqrt()
    return lambda v: root * operator(root * v)

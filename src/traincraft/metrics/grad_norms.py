"""Gradient-norm arithmetic for clipping and gradient health: pure functions of device tensors, no state.

Everything here stays on the device (no ``.item()``): callers decide when to copy a result to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "agc_coefficient",
    "clip_coefficient",
    "depth_slope",
    "ema_moments",
    "norm_from_power",
    "norm_power",
    "quantile_threshold",
    "tensor_norms",
    "unitwise_norm",
    "warmup_moments",
    "zscore_threshold",
]


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type == math.inf or norm_type > 0):
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}; use 2.0 for the L2 norm.")
    return norm_type


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The p-norm of each tensor, as one vector, in one fused pass (``torch._foreach_norm``).

    Args:
        tensors: tensors on one device (gradients, usually); an empty sequence gives an empty vector.
        norm_type: p of the p-norm, ``inf`` for the max-abs norm.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])])
        tensor([5., 2.])
    """
    norm_type = _check_norm_type(norm_type)
    if len(tensors) == 0:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(tensors), norm_type)).float()


def norm_power(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """What ranks holding disjoint parts of a model add up: the sum of p-th powers (the max for ``inf``).

    All-reduce it with ``SUM`` (``MAX`` for ``inf``) and pass the result to :func:`norm_from_power`.

    Example:
        >>> norm_power(torch.tensor([3.0, 4.0]))
        tensor(25.)
    """
    norm_type = _check_norm_type(norm_type)
    if norm_type == math.inf:
        return norms.max() if norms.numel() else norms.new_zeros(())
    return norms.pow(norm_type).sum()


def norm_from_power(power: Tensor, norm_type: float = 2.0) -> Tensor:
    """Inverse of :func:`norm_power`: the global p-norm from a (reduced) sum of p-th powers.

    Example:
        >>> norm_from_power(norm_power(torch.tensor([3.0, 4.0])))
        tensor(5.)
    """
    norm_type = _check_norm_type(norm_type)
    return power if norm_type == math.inf else power.pow(1.0 / norm_type)


def clip_coefficient(norm: Tensor, max_norm: Tensor | float, eps: float = 1e-6) -> Tensor:
    """The factor that brings a norm down to ``max_norm``, clamped to 1 so that small gradients are kept as they are.

    Computed without a branch (as ``torch.nn.utils.clip_grad_norm_`` does), so it needs no host decision. A
    non-finite norm gives 0 (``inf``) or NaN: callers must skip such steps rather than apply the factor.

    Example:
        >>> clip_coefficient(torch.tensor([10.0, 0.5]), 1.0, eps=0.0)
        tensor([0.1000, 1.0000])
    """
    return (max_norm / (norm + eps)).clamp(max=1.0)


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm of each output unit: over every dimension but the first (a whole vector or scalar is one unit).

    For a ``Linear`` weight ``(out, in)`` this is the norm of each row, for a convolution ``(out, in, kh, kw)`` that
    of each filter, as in Brock et al. 2021 (NFNets), with the result shaped to broadcast against ``x``.

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5.],
                [1.]])
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_coefficient(weight: Tensor, grad: Tensor, clipping: float = 0.01, eps: float = 1e-3) -> Tensor:
    """Adaptive gradient clipping (AGC): the per-unit factor for ``grad`` so that no unit's gradient norm exceeds
    ``clipping`` times the norm of its weights (floored at ``eps``, so zero-initialized units can still move).

    Args:
        weight: the parameter.
        grad: its gradient, same shape.
        clipping: λ, the largest allowed ratio of gradient norm to weight norm per unit.
        eps: floor on the weight norm.

    Example:
        >>> w, g = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.001, 0.0]])
        >>> agc_coefficient(w, g, clipping=0.1)
        tensor([[0.5000],
                [1.0000]])
    """
    if clipping <= 0 or eps < 0:
        raise ValueError(f"clipping must be > 0 and eps >= 0, got clipping={clipping}, eps={eps}.")
    max_norm = unitwise_norm(weight.detach()).clamp(min=eps) * clipping
    grad_norm = unitwise_norm(grad)
    return torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))


def quantile_threshold(history: Tensor, q: float) -> Tensor:
    """AutoClip's threshold (Seetharaman et al. 2020): the ``q``-quantile of the norms seen so far, per column.

    ``history`` is ``(steps, groups)``; NaN entries (unfilled slots, non-finite steps) are ignored. A column with
    no finite entry gives ``inf`` (no clipping yet).

    Example:
        >>> quantile_threshold(torch.tensor([[1.0], [2.0], [float("nan")], [3.0]]), 0.5)
        tensor([2.])
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}; AutoClip uses 0.1 (the 10th percentile).")
    threshold = torch.nanquantile(history.float(), q, dim=0)
    return torch.where(torch.isnan(threshold), torch.full_like(threshold, math.inf), threshold)


def ema_moments(mean: Tensor, var: Tensor, value: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """One step of the exponential moving mean and variance used by ZClip (Kumar et al. 2025).

    ``mean' = a·mean + (1−a)·x`` and ``var' = a·var + (1−a)·(x − mean')²`` with ``a = decay``.

    Example:
        >>> ema_moments(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(3.0), 0.5)
        (tensor(2.), tensor(0.5000))
    """
    new_mean = decay * mean + (1.0 - decay) * value
    new_var = decay * var + (1.0 - decay) * (value - new_mean) ** 2
    return new_mean, new_var


def warmup_moments(total: Tensor, total_sq: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance from running sums, as ZClip estimates them over its warm-up steps.

    ``count`` is floored at 1, so no value yet gives zeros; the variance is clamped at 0 against rounding.

    Example:
        >>> warmup_moments(torch.tensor(6.0), torch.tensor(14.0), torch.tensor(3.0))
        (tensor(2.), tensor(0.6667))
    """
    n = count.clamp(min=1)
    mean = total / n
    return mean, (total_sq / n - mean**2).clamp(min=0)


def zscore_threshold(mean: Tensor, var: Tensor, z: float) -> Tensor:
    """The largest norm that is not a spike: ``mean + z·std``.

    Example:
        >>> zscore_threshold(torch.tensor(2.0), torch.tensor(4.0), 2.5)
        tensor(7.)
    """
    return mean + z * var.clamp(min=0).sqrt()


def depth_slope(norms: Tensor) -> Tensor:
    """Least-squares slope of ``ln(norm)`` per layer, with layers ordered as backpropagation visits them.

    ``norms[0]`` belongs to the layer next to the loss (the output layer) and ``norms[-1]`` to the one next to the
    input. A negative slope means the gradient shrinks as it travels back (vanishing), a positive one that it grows
    (exploding); ``-0.1`` means each layer towards the input receives ``e^-0.1 ≈ 0.9`` times the gradient norm.
    Fewer than two layers give 0.

    Example:
        >>> depth_slope(torch.tensor([1.0, 0.5, 0.25]))
        tensor(-0.6931)
    """
    if norms.numel() < 2:
        return norms.new_zeros(())
    y = torch.log(norms.float())
    x = torch.arange(norms.numel(), dtype=y.dtype, device=y.device)
    x = x - x.mean()
    return (x * (y - y.mean())).sum() / (x * x).sum()

"""Statistics of parameter updates Δθ: size relative to the weights, and whether consecutive updates oscillate.

Pure functions on flat tensors or lists of tensors; they return 0-dim device tensors and never copy to the host.
The theory's rule "decrease the learning rate when the weight vector oscillates, increase it when it follows a
steady direction" reads them: a cosine near -1 between consecutive updates (and many weights whose update changed
sign) means oscillation across a valley; a cosine near +1 means a steady direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

Tensors = Union[Tensor, Sequence[Tensor]]

_TINY = 1e-30


def _norm(x: Tensors) -> Tensor:
    if isinstance(x, Tensor):
        return torch.linalg.vector_norm(x.float())
    if not x:
        raise ValueError("got an empty list of tensors; pass at least one tensor.")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.float() for t in x])))


def update_weight_ratio(update: Tensors, weights: Tensors) -> Tensor:
    """‖Δθ‖ / ‖θ‖ over all given tensors (0 where the weights are all zero). A healthy rate gives about 1e-3.

    Example:
        >>> update_weight_ratio(torch.tensor([0.003, 0.004]), torch.tensor([3.0, 4.0]))
        tensor(0.0010)
    """
    return _norm(update) / _norm(weights).clamp_min(_TINY)


def update_cosine(current: Tensor, previous: Tensor) -> Tensor:
    """Cosine between two consecutive flat updates; 0 when either is zero (no direction to compare).

    Example:
        >>> update_cosine(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]))
        tensor(-1.)
    """
    _check_pair(current, previous)
    dot = torch.dot(current.float(), previous.float())
    return dot / (_norm(current) * _norm(previous)).clamp_min(_TINY)


def sign_flip_fraction(current: Tensor, previous: Tensor) -> Tensor:
    """Fraction of weights whose update changed sign between two consecutive flat updates (zeros never flip).

    Example:
        >>> sign_flip_fraction(torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([-1.0, -1.0, 0.5, 1.0]))
        tensor(0.2500)
    """
    _check_pair(current, previous)
    return ((current * previous) < 0).sum(dtype=torch.float32) / max(current.numel(), 1)


def update_agreement(current: Tensor, previous: Tensor, previous_square: Tensor,
                     workspace: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine and sign-flip fraction of two consecutive flat updates in one pass, reusing ‖previous‖².

    The per-step form of :func:`update_cosine` and :func:`sign_flip_fraction`: the product is formed once and the
    previous update's squared norm comes from the step before. Returns ``(cosine, flip_fraction, ‖current‖²)``.
    ``workspace``, a float tensor of the same shape, receives the product and its signs instead of fresh memory
    (it may be ``previous`` itself when that is no longer needed): large CPU allocations fault in new pages every
    step. The flips are counted in float arithmetic (sign, clamp, sum: three times faster on CPU than a boolean
    mask), exact up to 2²⁴ flips per call.

    Example:
        >>> cos, flips, square = update_agreement(torch.tensor([1.0, -2.0]), torch.tensor([-1.0, -1.0]),
        ...                                       torch.tensor(2.0))
        >>> round(cos.item(), 4), flips.item(), square.item()
        (0.3162, 0.5, 5.0)
    """
    _check_pair(current, previous)
    if workspace is None:
        workspace = torch.empty_like(current)
    elif workspace.shape != current.shape or not workspace.dtype.is_floating_point:
        raise ValueError(f"workspace must be a float tensor of shape {tuple(current.shape)}; got "
                         f"{workspace.dtype} {tuple(workspace.shape)}.")
    square = torch.dot(current, current)
    product = torch.mul(current, previous, out=workspace)
    cosine = product.sum() / (square.sqrt() * previous_square.sqrt()).clamp_min(_TINY)  # no overflow of ‖·‖⁴
    # -0.0 (a zero update against a negative one) must not count: clamp keeps it -0.0 and sign maps it to 0
    flips = -torch.sign(product.clamp_(max=0), out=product).sum() / max(current.numel(), 1)
    return cosine, flips, square


def adam_effective_lr(lr: float, exp_avg_sq: Tensor, step: Union[Tensor, float], beta2: float, eps: float) -> Tensor:
    """Per-weight effective step size of Adam, lr / (√v̂ + ε) with v̂ = v / (1 - β₂ᵗ) (Kingma & Ba 2015).

    Example:
        >>> adam_effective_lr(0.1, torch.tensor([0.0, 0.04]), step=1, beta2=0.0, eps=0.0).tolist()
        [inf, 0.5]
    """
    correction = 1 - beta2 ** torch.as_tensor(step, dtype=torch.float32, device=exp_avg_sq.device)
    return lr / ((exp_avg_sq.float() / correction).sqrt() + eps)


def _check_pair(current: Tensor, previous: Tensor) -> None:
    if current.shape != previous.shape:
        raise ValueError(
            f"consecutive updates must have the same shape; got {tuple(current.shape)} and {tuple(previous.shape)}. "
            "Pass the flattened update of the same parameters at two consecutive steps."
        )

"""Second-order steps near saddle points: Newton, saddle-free Newton, and conjugate gradient over Hessian-vector
products.

Newton's step ``-H⁻¹∇f`` jumps to the stationary point of the local quadratic model. Near a minimum that is the
minimum; near a saddle it is the saddle itself: along a direction of negative curvature ``λ < 0`` the step
``-g/λ`` points *up* the gradient, towards the saddle, where gradient descent's ``-ηg`` moves away from it.
The saddle-free variant (Dauphin et al. 2014, "Identifying and attacking the saddle point problem") rescales by
``|H|⁻¹ = Q|Λ|⁻¹Qᵀ`` instead: the Newton step's size along every eigen-direction, always downhill, so it leaves a
saddle at a rate set by the curvature rather than by a learning rate.

For networks, ``H⁻¹∇f`` is solved without forming ``H``: :func:`conjugate_gradient` needs only the products ``v ↦
Hv`` that :func:`traincraft.metrics.hessian.hessian_vector_operator` provides (Martens 2010, "Hessian-free
optimization"). These are plain functions for examples and probes; they synchronize with the host each
iteration (a tolerance test) and do not belong in per-step training code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


def _check_square(hessian: Tensor, gradient: Tensor) -> None:
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1] or gradient.shape != hessian.shape[:1]:
        raise ValueError(
            f"expected a square Hessian (n, n) and a gradient (n,); got {tuple(hessian.shape)} and "
            f"{tuple(gradient.shape)}. Flatten the parameters into one vector first."
        )


def newton_step(gradient: Tensor, hessian: Tensor) -> Tensor:
    """``-H⁻¹g``: the step to the stationary point of the quadratic model (a saddle, if ``H`` is indefinite).

    Example:
        >>> newton_step(torch.tensor([1.0, -2.0]), torch.diag(torch.tensor([1.0, -1.0])))  # f = x²/2 - y²/2
        tensor([-1., -2.])
    """
    _check_square(hessian, gradient)
    return -torch.linalg.solve(hessian, gradient)


def saddle_free_step(gradient: Tensor, hessian: Tensor, damping: float = 0.0) -> Tensor:
    """``-|H|⁻¹g`` with ``|H| = Q max(|Λ|, damping) Qᵀ`` from the eigen-decomposition: Newton's step lengths, each
    eigen-direction's sign turned downhill. ``damping`` bounds the step where the curvature is near zero.

    Example:
        >>> saddle_free_step(torch.tensor([1.0, -2.0]), torch.diag(torch.tensor([1.0, -1.0])))  # away from y = 0
        tensor([-1.,  2.])
    """
    _check_square(hessian, gradient)
    if damping < 0:
        raise ValueError(f"damping must be >= 0; got {damping}.")
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    scale = eigenvalues.abs().clamp_min(damping)
    return -eigenvectors @ ((eigenvectors.T @ gradient) / scale)


class CGResult(NamedTuple):
    solution: Tensor  # x with H x ≈ b
    iterations: int
    residual_norm: float  # ‖b - Hx‖ (recursive estimate)
    negative_curvature: bool  # some search direction p had pᵀHp <= 0: H is not positive definite


def conjugate_gradient(operator: Operator, rhs: Tensor, max_iterations: Optional[int] = None,
                       tolerance: float = 1e-10, init: Optional[Tensor] = None) -> CGResult:
    """Solve ``H x = rhs`` for a symmetric ``H`` given only ``v ↦ Hv``.

    Conjugate gradient converges in at most ``n`` products (exact arithmetic) for positive definite ``H``. On an
    indefinite ``H`` (near a saddle, which is what Newton's method needs here) it still solves the system unless a
    search direction has exactly zero curvature; ``negative_curvature`` reports whether one had ``pᵀHp <= 0``, and
    a zero curvature stops the iteration rather than divide by it. Stops when ``‖r‖ <= tolerance · ‖rhs‖``.

    Example:
        >>> H = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
        >>> result = conjugate_gradient(lambda v: H @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(H @ result.solution, torch.tensor([1.0, 2.0], dtype=torch.float64)), result.negative_curvature
        (True, True)
    """
    if rhs.ndim != 1:
        raise ValueError(f"rhs must be a flat vector (n,); got shape {tuple(rhs.shape)}. Flatten it (and the operator's input).")
    if max_iterations is None:
        max_iterations = rhs.numel()
    if max_iterations < 1 or tolerance < 0:
        raise ValueError(f"need max_iterations >= 1 and tolerance >= 0; got {max_iterations} and {tolerance}.")
    x = torch.zeros_like(rhs) if init is None else init.clone()
    r = rhs - operator(x) if init is not None else rhs.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    stop = (tolerance * torch.linalg.vector_norm(rhs)) ** 2
    negative, iterations = False, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (the count is returned)
        if rr <= stop:
            iterations -= 1
            break
        hp = operator(p)
        curvature = torch.dot(p, hp)
        negative = negative or bool(curvature <= 0)
        if curvature == 0:
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * hp
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return CGResult(x, iterations, float(rr.sqrt()), negative)


def dense_hessian(operator: Operator, size: int, dtype: torch.dtype = torch.float64,
                  device: Optional[torch.device] = None) -> Tensor:
    """The ``(size, size)`` Hessian built column by column from ``size`` products (a reference for small models)."""
    eye = torch.eye(size, device=device)
    columns = [operator(eye[i]).to(dtype) for i in range(size)]
    if columns and columns[0].shape != (size,):
        raise ValueError(
            f"the operator returned shape {tuple(columns[0].shape)} for a vector of shape ({size},); it must map flat "
            "vectors to flat vectors of the same size (size = the number of parameters it differentiates)."
        )
    hessian = torch.stack(columns, dim=1)
    return (hessian + hessian.T) / 2  # products are exact up to rounding; symmetrize the rounding away

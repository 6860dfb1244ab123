"""Both ends of a symmetric operator's spectrum: power iteration, Lanczos, and small dense eigenpairs on the device.

The operator is usually a Hessian reached through products (:func:`traincraft.metrics.hessian_vector.hessian_vector_operator`);
"sharpness" is its largest *algebraic* eigenvalue, which :func:`lanczos` finds together with the smallest. Nothing
here synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from traincraft.metrics.hessian_vector import Operator

_TINY = 1e-30


def power_iteration(operator: Operator, init: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector.

    Not the sharpness off a minimum: where |λ_min| > λ_max it converges to λ_min. Use :func:`lanczos` for λ_max.

    Warm-start with the previous eigenvector: the top eigenvector moves slowly during training, so a few iterations
    from it reach the accuracy that a cold start needs many for. The eigenvalue is the Rayleigh quotient of the
    last iterate.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> value, vector = power_iteration(lambda v: A @ v, torch.ones(3), iterations=50)
        >>> round(value.item(), 4), vector.abs().argmax().item()
        (3.0, 0)
    """
    if iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (operator products); got {iterations!r}. Pass e.g. 20.")
    vector = init.float() / torch.linalg.vector_norm(init.float()).clamp_min(_TINY)
    value = torch.zeros((), device=init.device)
    for _ in range(iterations):
        image = operator(vector)
        value = torch.dot(vector, image)
        vector = image / torch.linalg.vector_norm(image).clamp_min(_TINY)
    return value, vector


class ExtremeEigenpairs(NamedTuple):
    """Both ends of a symmetric operator's spectrum (algebraic order), as device scalars and unit vectors."""

    lambda_min: Tensor
    lambda_max: Tensor
    vector_min: Tensor
    vector_max: Tensor
    quotient: Optional[Tensor] = None  # aᵀHa/aᵀa of the ``also`` vector, when one was given


def lanczos(operator: Operator, starts: Union[Tensor, Sequence[Tensor]], iterations: int,
            generator: Optional[torch.Generator] = None, also: Optional[Tensor] = None) -> ExtremeEigenpairs:
    """Largest and smallest *algebraic* eigenvalues of a symmetric operator, by Lanczos with full reorthogonalization.

    Power iteration converges to the eigenvalue of largest magnitude, which off a minimum (saddles, early training,
    transformers) is often a large negative one; "sharpness" is the largest algebraic eigenvalue. Lanczos builds an
    orthonormal basis Q of the Krylov space of the start vector(s), one operator product per basis vector, and takes
    the extreme eigenpairs of the projected matrix QᵀHQ (Rayleigh-Ritz): both ends of the spectrum converge first,
    faster than power iteration converges to either. Every new vector is orthogonalized twice against the whole
    basis ("twice is enough"), so rounding never produces ghost copies of converged eigenvalues.

    Warm starts: pass the previous probe's extreme vectors as ``starts``; the basis then begins with them
    (orthonormalized: a block Krylov space). Storage is ``iterations`` flat vectors. Nothing syncs with the host:
    the small projected eigenproblem is solved on the device (:func:`extreme_eigenpairs`), and a breakdown (an
    invariant subspace) continues with a random vector orthogonal to the basis instead of branching on a norm.

    Args:
        operator: ``v ↦ Hv`` on flat fp32 vectors, H symmetric.
        starts: one start vector, or several (warm starts); any scale, not all zero.
        iterations: operator products, i.e. the basis size (capped at the dimension).
        generator: for the random vectors that replace a breakdown.
        also: a vector a whose Rayleigh quotient aᵀHa/aᵀa is wanted too (the gradient: the directional
            curvature). It becomes the last basis vector instead of a Krylov one, so a lies in the basis and its
            quotient is read off QᵀHQ exactly, for no extra product (``iterations`` >= 2).

    Example:
        >>> A = torch.diag(torch.tensor([2.0, 1.0, -0.5, -5.0]))  # power iteration would find -5
        >>> pairs = lanczos(lambda v: A @ v, torch.ones(4), iterations=4)
        >>> round(pairs.lambda_max.item(), 4), round(pairs.lambda_min.item(), 4)
        (2.0, -5.0)
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (operator products); got {iterations!r}. Pass e.g. 20.")
    starts = [starts] if isinstance(starts, Tensor) else list(starts)
    if not starts:
        raise ValueError("starts is empty: pass at least one start vector (e.g. torch.randn(n)).")
    size = starts[0].numel()
    if any(s.ndim != 1 or s.numel() != size for s in starts):
        raise ValueError(f"start vectors must be flat and of one size; got shapes {[tuple(s.shape) for s in starts]}. "
                         "Flatten them (traincraft.metrics.hessian.flatten) to the operator's size.")
    device = starts[0].device
    steps = min(iterations, size)
    if also is not None and (steps < 2 or also.shape != starts[0].shape):
        raise ValueError(f"also needs iterations >= 2, a dimension >= 2 and the start's shape; got {iterations} "
                         f"iterations, dimension {size}, shape {tuple(also.shape)}. Raise iterations, pass a flat "
                         "vector of the start's size, or compute the quotient with directional_curvature.")
    basis = torch.zeros(steps, size, device=device)
    projected = torch.zeros(steps, steps, device=device, dtype=torch.float64)
    filled = 0
    for start in starts[:steps]:
        basis[filled] = _orthonormal(start.float(), basis[:filled], generator)
        filled += 1
    for j in range(steps):
        image = operator(basis[j])
        coefficients = basis[:filled] @ image  # column j of QᵀHQ for the vectors so far (i ≤ j among them)
        projected[:filled, j] = coefficients.double()
        if filled < steps:
            last = also is not None and filled == steps - 1
            candidate = also.float() if last else image - coefficients @ basis[:filled]
            basis[filled] = _orthonormal(candidate, basis[:filled], generator)
            filled += 1
    upper = projected.triu()
    projected = upper + upper.T - torch.diag(upper.diagonal())
    low, high, y_low, y_high = extreme_eigenpairs(projected)
    vector_min, vector_max = y_low.float() @ basis, y_high.float() @ basis
    quotient = None
    if also is not None:
        c = (basis @ (also.float() / torch.linalg.vector_norm(also.float()).clamp_min(_TINY))).double()
        quotient = (c @ projected @ c / (c @ c).clamp_min(_TINY)).float()
    return ExtremeEigenpairs(low.float(), high.float(), vector_min, vector_max, quotient)


def _orthonormal(vector: Tensor, basis: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``vector`` orthogonalized (twice) against the rows of ``basis`` and normalized; a random one if it vanishes."""
    scale = torch.linalg.vector_norm(vector)
    for _ in range(2):
        vector = vector - (basis @ vector) @ basis
    norm = torch.linalg.vector_norm(vector)
    fallback = torch.randn(vector.numel(), generator=generator, device=vector.device) if generator is not None \
        else torch.randn(vector.numel(), device=vector.device)
    for _ in range(2):
        fallback = fallback - (basis @ fallback) @ basis
    fallback = fallback / torch.linalg.vector_norm(fallback).clamp_min(_TINY)
    # a breakdown: what is left is rounding noise (relative 1e-5 in fp32), so continue with a fresh direction
    return torch.where(norm > 1e-5 * scale.clamp_min(_TINY), vector / norm.clamp_min(_TINY), fallback)


def extreme_eigenpairs(matrix: Tensor, squarings: int = 60) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(λ_min, λ_max, v_min, v_max) of a small symmetric matrix, on its device and without a host sync.

    ``torch.linalg.eigh`` on CUDA checks its status on the host (and runs small matrices on the CPU). Instead, each
    end is the dominant eigenvector of a positive semi-definite shift (M + rI or rI - M, r a Gershgorin bound),
    found by repeated squaring: after k squarings the power is 2^k, so 60 squarings separate eigenvalues that
    differ by a relative 1e-16. The eigenvalue is the Rayleigh quotient of that vector (exact to second order).

    Example:
        >>> m = torch.tensor([[1.0, 2.0], [2.0, -2.0]], dtype=torch.float64)  # eigenvalues -3 and 2
        >>> [round(x.item(), 6) for x in extreme_eigenpairs(m)[:2]]
        [-3.0, 2.0]
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square symmetric matrix; got shape {tuple(matrix.shape)}. Pass the (k, k) matrix.")
    radius = matrix.abs().sum(dim=1).max()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    top = _dominant_vector(matrix + radius * eye, squarings)
    bottom = _dominant_vector(radius * eye - matrix, squarings)
    return bottom @ matrix @ bottom, top @ matrix @ top, bottom, top


def _dominant_vector(psd: Tensor, squarings: int) -> Tensor:
    power = psd / torch.linalg.matrix_norm(psd).clamp_min(_TINY)
    for _ in range(squarings):
        power = power @ power
        power = power / torch.linalg.matrix_norm(power).clamp_min(_TINY)
    # the power is now ≈ v vᵀ: its largest column is a multiple of v (index chosen on the device)
    column = torch.index_select(power, 1, (power * power).sum(dim=0).argmax().reshape(1)).reshape(-1)
    vector = power @ column  # one more product cleans the column
    return vector / torch.linalg.vector_norm(vector).clamp_min(_TINY)

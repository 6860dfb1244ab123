"""The simple gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training").

With per-example gradients g_i of mean G and covariance Σ, a mini-batch gradient of ``b`` examples has
E|g_b|² = |G|² + tr(Σ)/b. Two batch sizes, here one rank's local batch ``b`` and the all-reduced global batch
``B = n·b``, give two such equations, solved (their Appendix A.1) for unbiased estimates of

    |G|²   ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ)  ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

and B_simple = tr(Σ)/|G|², the batch size at which the gradient noise equals the signal: an estimate of the
critical batch size. Each single estimate is noisy (tr(Σ) can even come out negative); they are averaged over
steps *before* taking the ratio, as the paper recommends.
"""

from __future__ import annotations

import torch


def _check_batches(local_batch: float, global_batch: float) -> None:
    if not 0 < local_batch < global_batch:
        raise ValueError(
            f"the noise scale needs 0 < local_batch < global_batch; got local_batch={local_batch}, "
            f"global_batch={global_batch}: run on more than one rank (or with a larger global batch)"
        )


def squared_gradient_norm_estimate(
    local_sq_norm: torch.Tensor, global_sq_norm: torch.Tensor, local_batch: float, global_batch: float
) -> torch.Tensor:
    """Unbiased estimate of |G|² from the squared norms of a ``local_batch`` and a ``global_batch`` gradient.

    Example:
        >>> squared_gradient_norm_estimate(torch.tensor(5.0), torch.tensor(2.0), 1, 4)  # |G|²=1, tr(Σ)=4
        tensor(1.)
    """
    _check_batches(local_batch, global_batch)
    return (global_batch * global_sq_norm - local_batch * local_sq_norm) / (global_batch - local_batch)


def gradient_variance_estimate(
    local_sq_norm: torch.Tensor, global_sq_norm: torch.Tensor, local_batch: float, global_batch: float
) -> torch.Tensor:
    """Unbiased estimate of tr(Σ), the per-example gradient variance summed over parameters.

    Example:
        >>> gradient_variance_estimate(torch.tensor(5.0), torch.tensor(2.0), 1, 4)
        tensor(4.)
    """
    _check_batches(local_batch, global_batch)
    return (local_sq_norm - global_sq_norm) / (1.0 / local_batch - 1.0 / global_batch)


def simple_noise_scale(squared_norm: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """B_simple = tr(Σ)/|G|² from (averaged) estimates; ``nan`` where |G|² is not positive (no signal yet).

    Example:
        >>> simple_noise_scale(torch.tensor(1.0), torch.tensor(4.0))
        tensor(4.)
    """
    return torch.where(squared_norm > 0, variance / squared_norm, torch.full_like(squared_norm, float("nan")))

"""Two-sample tests for distribution drift between a reference sample ``x`` (n, d) and a current sample ``y`` (m, d).

* Per-feature Kolmogorov–Smirnov: the statistic on the device for all features at once; p-values from the exact
  null distribution (lattice paths, vectorized over features) or the asymptotic one (``scipy.stats.kstwo``), with a
  Bonferroni correction over the features.
* Kernel MMD² (Gretton et al. 2012) with a Gaussian kernel of median-heuristic bandwidth, and a permutation test in
  which all permutations are index matrices: each chunk of permutations costs one matrix product with the kernel
  matrix instead of one Python iteration per permutation.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch


def _check_samples(x: torch.Tensor, y: torch.Tensor, min_rows: int = 1) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor (samples, features); got {got}. Flatten features first.")
        if t.shape[0] < min_rows:
            raise ValueError(f"{name} has {t.shape[0]} samples; the test needs at least {min_rows}.")
        if t.is_complex():
            raise ValueError(f"{name} is complex ({t.dtype}); pass real features, e.g. torch.view_as_real(t).flatten(1).")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features and y has {y.shape[1]}; both samples must have the same.")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} and y on {y.device}; move both to one device.")


def _wide_float(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------------------- Kolmogorov–Smirnov
def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two-sided two-sample KS statistic ``D = sup |F_x − F_y|`` of every feature, shape ``(d,)``, on the device.

    Example:
        >>> ks_statistic(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])).tolist()
        [1.0]
    """
    _check_samples(x, y)
    n, m = x.shape[0], y.shape[0]
    values, order = torch.sort(torch.cat([x, y]).detach(), dim=0)
    dtype = _wide_float(values.device)
    step = torch.where(order < n, torch.tensor(1.0 / n, dtype=dtype, device=values.device),
                       torch.tensor(-1.0 / m, dtype=dtype, device=values.device))
    gap = step.cumsum(dim=0).abs()
    # ECDFs jump only after the last of tied values: evaluate the difference there only.
    last_of_run = torch.ones_like(values, dtype=torch.bool)
    last_of_run[:-1] = values[1:] != values[:-1]
    return (gap * last_of_run).amax(dim=0)


def _ks_exact_sf(d: np.ndarray, n: int, m: int) -> np.ndarray:
    """``P(D >= d)`` under the null, exactly: one minus the share of the C(n+m, n) monotone lattice paths from
    (0, 0) to (n, m) that stay strictly inside ``|i/n − j/m| < d``; one row of the lattice per iteration, all
    features at once, rescaled per row so that path counts never overflow."""
    if n > m:
        n, m = m, n
    h = np.round(np.asarray(d, dtype=np.float64) * n * m)[:, None]  # |i m − j n| < h  ⇔  |i/n − j/m| < d
    j = np.arange(m + 1, dtype=np.float64)[None, :]
    paths = np.zeros((h.shape[0], m + 1))
    paths[:, 0] = 1.0
    log_scale = np.zeros(h.shape[0])
    for i in range(n + 1):
        inside = np.abs(i * m - j * n) < h
        paths = np.cumsum(paths * inside, axis=1) * inside
        peak = paths.max(axis=1)
        peak[peak == 0] = 1.0
        paths /= peak[:, None]
        log_scale += np.log(peak)
    with np.errstate(divide="ignore"):
        log_inside = np.log(paths[:, -1]) + log_scale
    log_total = math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
    return np.clip(1.0 - np.exp(log_inside - log_total), 0.0, 1.0)


def ks_pvalues(
    statistic: torch.Tensor | np.ndarray, n: int, m: int, method: Literal["auto", "exact", "asymp"] = "auto"
) -> np.ndarray:
    """Two-sided p-values of KS statistics for sample sizes ``n`` and ``m`` (a host computation).

    ``"exact"`` counts lattice paths (as ``scipy.stats.ks_2samp(method="exact")``); ``"asymp"`` uses the
    Kolmogorov distribution of ``round(nm / (n + m))`` samples (as ``method="asymp"``); ``"auto"`` is exact while
    ``min(n, m) · max(n, m) · features ≤ 5·10⁷``.
    """
    if method not in ("auto", "exact", "asymp"):
        raise ValueError(f"method must be 'auto', 'exact' or 'asymp'; got {method!r}.")
    if n < 1 or m < 1:
        raise ValueError(f"both samples need at least one value; got n={n}, m={m}.")
    d = statistic.detach().cpu().double().numpy() if isinstance(statistic, torch.Tensor) else np.asarray(statistic)
    d = np.atleast_1d(d).astype(np.float64)
    if method == "auto":
        method = "exact" if n * m * d.size <= 5e7 else "asymp"
    if method == "exact":
        return _ks_exact_sf(d, n, m)
    from scipy.stats import kstwo

    return np.clip(kstwo.sf(d, np.round(n * m / (n + m))), 0.0, 1.0)


class KSResult(NamedTuple):
    statistic: np.ndarray  #: KS statistic per feature
    pvalue: np.ndarray  #: unadjusted p-value per feature
    adjusted_pvalue: np.ndarray  #: Bonferroni-adjusted p-value per feature, ``min(1, d · p)``
    rejected: bool  #: True when some adjusted p-value is below ``alpha``


def ks_test(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 0.05, method: Literal["auto", "exact", "asymp"] = "auto"
) -> KSResult:
    """Per-feature KS tests with a Bonferroni correction: rejects "same distribution" when any feature's p-value
    is below ``alpha / d``. Family-wise error at most ``alpha`` whatever the dependence between features.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)
        >>> ks_test(x, y).rejected, ks_test(x, y + torch.tensor([0.0, 0.0, 1.0])).rejected
        (False, True)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}. The usual choice is 0.05.")
    stat = ks_statistic(x, y)
    nonfinite = torch.stack([(~torch.isfinite(t)).any(1).sum() for t in (x, y)]).to(stat.dtype)
    host = torch.cat([stat, nonfinite]).cpu().numpy()  # the one copy to the host
    stat, nonfinite = host[:-2], host[-2:]
    if nonfinite.any():
        raise ValueError(
            f"x has {int(nonfinite[0])} of {x.shape[0]} samples and y {int(nonfinite[1])} of {y.shape[0]} with NaN or "
            f"infinite features; the KS test orders values and would give a wrong statistic. Find where they come "
            f"from (a diverged model, a bad batch) or drop those rows before testing."
        )
    p = ks_pvalues(stat, x.shape[0], y.shape[0], method)
    adjusted = np.minimum(p * p.size, 1.0)
    return KSResult(stat, p, adjusted, bool(adjusted.min() < alpha))


# --------------------------------------------------------------------------------------------------------- MMD
def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(len(a), len(b))`` through one matrix product."""
    sq = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0)


def median_bandwidth(z: torch.Tensor, max_points: int = 1000) -> torch.Tensor:
    """The median heuristic: the median pairwise distance among (at most ``max_points`` strided) rows of ``z``.

    Returns a 0-d device tensor; 1 where all rows coincide.
    """
    stride = max(1, math.ceil(z.shape[0] / max_points))
    sub = z[::stride] if z.is_floating_point() else z[::stride].float()
    sq = squared_distances(sub, sub)
    upper = torch.triu_indices(len(sub), len(sub), offset=1, device=z.device)
    median = torch.quantile(sq[upper[0], upper[1]].sqrt(), 0.5)  # interpolates between the middle two, as numpy
    return torch.where(median > 0, median, torch.ones_like(median))


def gaussian_kernel(z: torch.Tensor, bandwidth: torch.Tensor | float) -> torch.Tensor:
    """``k(a, b) = exp(−‖a − b‖² / (2σ²))`` over all pairs of rows of ``z``."""
    sq = squared_distances(z, z)
    return torch.exp(-sq / (2.0 * torch.as_tensor(bandwidth, dtype=sq.dtype, device=sq.device) ** 2))


def mmd2_unbiased(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) from the pooled kernel matrix whose first ``n`` rows are ``x``."""
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = kernel.shape[0] - n
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2.0 * kxy.sum() / (n * m))


def mmd2_of_splits(kernel: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of many splits of the pooled sample at once.

    ``members`` is a ``(B, N)`` 0/1 matrix: row ``b`` marks the ``n`` pooled rows that play ``x`` in split ``b``
    (the rest play ``y``). With ``w`` a row, ``Σ_xx k = wᵀKw``, ``Σ_xy k = wᵀK1 − wᵀKw`` and
    ``Σ_yy k = 1ᵀK1 − Σ_xx − 2Σ_xy``: the whole batch of splits costs one product ``members @ K``.
    """
    members = members.to(kernel.dtype)
    total_n = kernel.shape[0]
    n = members[0].sum()
    m = total_n - n
    kw = members @ kernel
    s_xx = (kw * members).sum(1)
    s_xy = members @ kernel.sum(1) - s_xx
    s_yy = kernel.sum() - s_xx - 2.0 * s_xy
    diag = kernel.diagonal()
    d_x = members @ diag
    d_y = diag.sum() - d_x
    return (s_xx - d_x) / (n * (n - 1)) + (s_yy - d_y) / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def random_splits(num: int, n: int, total: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(num, total)`` 0/1 matrix: each row marks ``n`` of ``total`` positions drawn uniformly without
    replacement (the first ``n`` entries of a random permutation), from a private generator."""
    generator = torch.Generator(device=device).manual_seed(seed)
    perms = torch.rand(num, total, generator=generator, device=device).argsort(dim=1)
    return torch.zeros(num, total, device=device).scatter_(1, perms[:, :n], 1.0)


class MMDResult(NamedTuple):
    statistic: torch.Tensor  #: unbiased MMD² of the observed split (0-d, on the device)
    pvalue: torch.Tensor  #: permutation p-value ``(1 + #{MMD²_perm ≥ MMD²}) / (1 + B)`` (0-d, on the device)
    bandwidth: torch.Tensor  #: Gaussian kernel bandwidth used (0-d)


def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    num_permutations: int = 1000,
    bandwidth: Optional[float] = None,
    seed: int = 0,
    chunk_size: int = 250,
) -> MMDResult:
    """Kernel two-sample test: unbiased MMD² with a Gaussian kernel and a permutation p-value, on the device.

    The kernel matrix of the pooled sample is computed once; the ``num_permutations`` relabelings are drawn as one
    index matrix (``seed`` makes them reproducible) and evaluated ``chunk_size`` at a time, one matrix product each.

    Args:
        x: reference sample ``(n, d)``, ``n ≥ 2``.
        y: current sample ``(m, d)``, ``m ≥ 2``.
        num_permutations: relabelings of the pooled sample that form the null distribution.
        bandwidth: Gaussian kernel bandwidth σ; ``None`` takes the median pairwise distance (median heuristic).
        seed: seed of the permutations.
        chunk_size: permutations per matrix product (memory ``chunk_size × (n + m)``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g)
        >>> bool(mmd_test(x, y, 200).pvalue > 0.05), bool(mmd_test(x, y + 1.0, 200).pvalue < 0.05)
        (True, True)
    """
    _check_samples(x, y, min_rows=2)
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or not isinstance(chunk_size, int) \
            or num_permutations < 1 or chunk_size < 1:
        raise ValueError(f"num_permutations and chunk_size must be positive integers; got {num_permutations!r}, "
                         f"{chunk_size!r}. Pass e.g. num_permutations=1000.")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive or None (median heuristic); got {bandwidth}.")
    z = torch.cat([x, y]).detach().float()
    n, total = x.shape[0], z.shape[0]
    sigma = median_bandwidth(z) if bandwidth is None else torch.tensor(float(bandwidth), device=z.device)
    kernel = gaussian_kernel(z, sigma)
    observed = mmd2_unbiased(kernel, n)
    splits = random_splits(num_permutations, n, total, seed, z.device)
    exceed = torch.zeros((), device=z.device)
    for start in range(0, num_permutations, chunk_size):
        null = mmd2_of_splits(kernel, splits[start : start + chunk_size])
        exceed = exceed + (null >= observed).sum()
    pvalue = (1.0 + exceed) / (1.0 + num_permutations)
    # NaN or infinite features make the statistic NaN, and no permutation reaches a NaN: say NaN, not "significant"
    pvalue = torch.where(torch.isfinite(observed), pvalue, torch.full_like(pvalue, float("nan")))
    return MMDResult(observed, pvalue, sigma)

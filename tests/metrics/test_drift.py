"""Drift tests against references: scipy's KS test, brute-force MMD, per-permutation loops; calibration and power."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import ks_2samp

from traincraft.metrics.drift import (
    gaussian_kernel,
    ks_pvalues,
    ks_statistic,
    ks_test,
    median_bandwidth,
    mmd2_of_splits,
    mmd2_unbiased,
    mmd_test,
    random_splits,
)


@pytest.mark.parametrize("n,m", [(30, 30), (40, 55), (7, 13), (120, 90)])
def test_ks_statistic_and_pvalues_equal_scipy(n, m):
    g = torch.Generator().manual_seed(n + m)
    x, y = torch.randn(n, 4, generator=g), torch.randn(m, 4, generator=g) * 1.3 + 0.4
    x[:, 0], y[:, 0] = x[:, 0].round(), y[:, 0].round()  # ties within and between samples
    d = ks_statistic(x, y).numpy()
    for method in ("exact", "asymp"):
        ref = [ks_2samp(x[:, k].numpy(), y[:, k].numpy(), method=method) for k in range(4)]
        np.testing.assert_allclose(d, [r.statistic for r in ref], atol=1e-12)
        np.testing.assert_allclose(ks_pvalues(d, n, m, method), [r.pvalue for r in ref], rtol=1e-9, atol=1e-12)


def test_ks_bonferroni_adjusts_by_the_number_of_features():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 5, generator=g), torch.randn(60, 5, generator=g)
    y[:, 2] += 0.8
    result = ks_test(x, y)
    np.testing.assert_allclose(result.adjusted_pvalue, np.minimum(5 * result.pvalue, 1.0))
    assert result.rejected and result.adjusted_pvalue.argmin() == 2


def test_mmd2_unbiased_equals_the_brute_force_sum():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)

    def k(a, b):
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * 1.7**2)))

    xs, ys = x.numpy(), y.numpy()
    xx = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j) / (9 * 8)
    yy = sum(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j) / (7 * 6)
    xy = sum(k(a, b) for a in xs for b in ys) / (9 * 7)
    got = mmd2_unbiased(gaussian_kernel(torch.cat([x, y]), 1.7), 9)
    assert got.item() == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_batched_permutations_equal_a_loop_over_permuted_kernel_matrices():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    kernel = gaussian_kernel(z, 1.2)
    splits = random_splits(40, 22, 50, seed=5).double()
    assert splits.sum(1).eq(22).all() and len({tuple(r.tolist()) for r in splits}) == 40
    loop = []
    for row in splits:
        order = torch.cat([row.nonzero().flatten(), (row == 0).nonzero().flatten()])
        loop.append(mmd2_unbiased(kernel[order][:, order], 22))
    torch.testing.assert_close(mmd2_of_splits(kernel, splits), torch.stack(loop), rtol=1e-10, atol=1e-12)


def test_median_bandwidth_is_the_median_pairwise_distance():
    z = torch.randn(41, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert median_bandwidth(z).item() == pytest.approx(np.median(pdist(z.numpy())), rel=1e-5)
    assert median_bandwidth(torch.ones(4, 2)).item() == 1.0  # all rows equal: a usable bandwidth, not 0


def test_mmd_pvalue_counts_the_permutations_at_or_above_the_statistic():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 2, generator=g), torch.randn(25, 2, generator=g)
    result = mmd_test(x, y, num_permutations=300, seed=11, chunk_size=64)
    z = torch.cat([x, y])
    kernel = gaussian_kernel(z, median_bandwidth(z))
    null = mmd2_of_splits(kernel, random_splits(300, 30, 55, seed=11))
    assert result.pvalue.item() == pytest.approx((1 + (null >= result.statistic).sum().item()) / 301)


# ---------------------------------------------------------------------------- calibration and power
TRIALS = 200


def test_ks_bonferroni_false_positive_rate_and_power():
    """No shift: 200 trials of 4 features, n = m = 100, FPR at α = 0.05 within [0.02, 0.08].
    Documented shift: the mean of one of the 4 features moves by 0.7 standard deviations; power >= 0.9."""
    g = torch.Generator().manual_seed(0)
    n, d = 100, 4
    x, y = torch.randn(n, TRIALS * d, generator=g), torch.randn(n, TRIALS * d, generator=g)
    p = ks_pvalues(ks_statistic(x, y), n, n, "exact").reshape(TRIALS, d)
    fpr = float((np.minimum(p * d, 1).min(1) < 0.05).mean())
    assert 0.02 <= fpr <= 0.08, fpr
    y[:, ::d] += 0.7
    p = ks_pvalues(ks_statistic(x, y), n, n, "exact").reshape(TRIALS, d)
    power = float((np.minimum(p * d, 1).min(1) < 0.05).mean())
    assert power >= 0.9, power


def test_mmd_permutation_false_positive_rate_and_power():
    """No shift: 200 trials, n = m = 50 in 4 dimensions, 200 permutations; FPR at α = 0.05 within [0.02, 0.08].
    Documented shift: the mean of one coordinate moves by 1 standard deviation; power >= 0.9."""
    g = torch.Generator().manual_seed(1)
    null_rejections = shift_rejections = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 400 small tests: a thread pool only adds wake-ups, badly so on a busy machine
    try:
        for trial in range(TRIALS):
            x, y = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
            null_rejections += bool(mmd_test(x, y, 200, seed=trial).pvalue < 0.05)
            y[:, 0] += 1.0
            shift_rejections += bool(mmd_test(x, y, 200, seed=trial).pvalue < 0.05)
    finally:
        torch.set_num_threads(threads)
    assert 0.02 <= null_rejections / TRIALS <= 0.08, null_rejections
    assert shift_rejections / TRIALS >= 0.9, shift_rejections


def test_bad_samples_are_rejected_with_a_fix():
    with pytest.raises(ValueError, match=r"2-D tensor .* got \(5,\)"):
        ks_statistic(torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="x has 2 features and y has 3"):
        mmd_test(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_test(torch.zeros(1, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="'auto', 'exact' or 'asymp'"):
        ks_pvalues(np.array([0.1]), 5, 5, "fast")
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        ks_test(torch.zeros(4, 1), torch.zeros(4, 1), alpha=5)


@pytest.mark.gpu
def test_the_tests_on_cuda_equal_the_cpu_ones():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(300, 6, generator=g), torch.randn(200, 6, generator=g) + 0.2
    cpu, gpu = ks_test(x, y), ks_test(x.cuda(), y.cuda())
    np.testing.assert_allclose(gpu.statistic, cpu.statistic, atol=1e-12)
    result = mmd_test(x.cuda(), y.cuda(), 500, seed=2)
    z = torch.cat([x, y]).cuda()
    kernel = gaussian_kernel(z, result.bandwidth)
    torch.testing.assert_close(result.statistic, mmd2_unbiased(kernel, 300))
    null = torch.stack([
        mmd2_unbiased(kernel[order][:, order], 300)
        for order in (torch.cat([r.nonzero().flatten(), (r == 0).nonzero().flatten()])
                      for r in random_splits(500, 300, 500, seed=2, device="cuda"))
    ])
    assert result.pvalue.item() == pytest.approx((1 + (null >= result.statistic).sum().item()) / 501)

"""The gradient noise scale estimates (McCandlish et al. 2018) against the exact statistics of per-example
gradients; DataParallelStrategy's use of them on real ranks is in tests/distributed/test_data_parallel_ddp.py."""

import pytest
import torch

from traincraft.metrics import noise_scale as ns


def test_noise_scale_estimates_recover_per_example_statistics():
    """Monte Carlo over i.i.d. mini-batches of per-example gradients vs their exact mean and covariance."""
    generator = torch.Generator().manual_seed(0)
    per_example = torch.randn(64, 5, generator=generator, dtype=torch.float64) * 2 + 0.7
    true_mean = per_example.mean(0)
    squared = true_mean.square().sum()
    variance = (per_example - true_mean).square().sum(1).mean()  # tr(Σ) of the population (i.i.d. draws)
    b, world, draws = 4, 4, 20000
    index = torch.randint(0, 64, (draws, world, b), generator=generator)
    local = per_example[index].mean(2)  # (draws, world, dim)
    local_sq = local.square().sum(-1).mean(1)  # mean over ranks of |g_b|²
    global_sq = local.mean(1).square().sum(-1)
    est_sq = ns.squared_gradient_norm_estimate(local_sq, global_sq, b, b * world).mean()
    est_var = ns.gradient_variance_estimate(local_sq, global_sq, b, b * world).mean()
    assert float(est_sq) == pytest.approx(float(squared), rel=0.03)
    assert float(est_var) == pytest.approx(float(variance), rel=0.03)
    assert float(ns.simple_noise_scale(est_sq, est_var)) == pytest.approx(float(variance / squared), rel=0.05)


def test_noise_scale_rejects_equal_batches_and_has_no_value_without_signal():
    with pytest.raises(ValueError, match="local_batch=8, global_batch=8"):
        ns.gradient_variance_estimate(torch.tensor(1.0), torch.tensor(1.0), 8, 8)
    assert torch.isnan(ns.simple_noise_scale(torch.tensor(-0.1), torch.tensor(2.0)))

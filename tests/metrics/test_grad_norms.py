"""Gradient-norm arithmetic against plain torch and numpy references."""

import math

import numpy as np
import pytest
import torch

from traincraft.metrics.grad_norms import (
    agc_coefficient,
    clip_coefficient,
    depth_slope,
    ema_moments,
    norm_from_power,
    norm_power,
    quantile_threshold,
    tensor_norms,
    unitwise_norm,
    warmup_moments,
    zscore_threshold,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 2, 2, generator=g), torch.randn(7, generator=g), torch.randn(5, 6, generator=g) * 10]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_norms_of_disjoint_parts_combine_to_the_norm_of_the_whole(p):
    tensors = _tensors()
    whole = torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p)
    norms = tensor_norms(tensors, p)
    assert torch.allclose(norms, torch.stack([torch.linalg.vector_norm(t, p) for t in tensors]))
    assert torch.allclose(norm_from_power(norm_power(norms, p), p), whole, rtol=1e-5)
    # two "ranks" holding different tensors add (or max) their powers: what an all-reduce computes
    shares = norm_power(norms[:1], p), norm_power(norms[1:], p)
    reduced = torch.maximum(*shares) if p == math.inf else shares[0] + shares[1]
    assert torch.allclose(norm_from_power(reduced, p), whole, rtol=1e-5)


def test_clip_coefficient_matches_torch_clip_grad_norm():
    tensors = _tensors()
    for max_norm in (0.5, 1e4):
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
        for p, t in zip(params, tensors, strict=True):
            p.grad = t.clone()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        reference = [p.grad for p in params]
        coef = clip_coefficient(norm_from_power(norm_power(tensor_norms(tensors))), max_norm)
        assert torch.allclose(total, norm_from_power(norm_power(tensor_norms(tensors))))
        for ours, ref in zip([t * coef for t in tensors], reference, strict=True):
            assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    assert clip_coefficient(torch.tensor(math.inf), 1.0) == 0


def _agc_numpy(w, g, clipping, eps):
    w, g = w.numpy().astype(np.float64), g.numpy().astype(np.float64)
    out = g.copy()
    rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    rows_g = out.reshape(out.shape[0], -1) if out.ndim > 1 else out.reshape(1, -1)
    for r in range(rows_w.shape[0]):
        max_norm = max(np.linalg.norm(rows_w[r]), eps) * clipping
        gn = np.linalg.norm(rows_g[r])
        if gn > max_norm:
            rows_g[r] *= max_norm / max(gn, 1e-6)
    return rows_g.reshape(g.shape)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 4), (9,)])
def test_agc_matches_a_unit_by_unit_numpy_reference(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    w[0] = 0  # a zero unit: the eps floor decides
    grad = torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    ours = grad * agc_coefficient(w, grad, clipping=0.05, eps=1e-3)
    assert np.allclose(ours.numpy(), _agc_numpy(w, grad, 0.05, 1e-3), rtol=1e-5, atol=1e-12)
    assert unitwise_norm(w).shape == ((shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else ())


def test_quantile_threshold_matches_numpy_nanpercentile():
    history = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    history[::7, 1] = math.nan
    history[:, 2] = math.nan
    ours = quantile_threshold(history, 0.1)
    ref = np.nanpercentile(history[:, :2].double().numpy(), 10, axis=0)
    assert np.allclose(ours[:2].numpy(), ref, rtol=1e-6)
    assert ours[2] == math.inf  # nothing seen yet: no clipping


def test_ema_moments_and_zscore_threshold_follow_the_recurrence():
    values = np.abs(np.random.default_rng(3).normal(1, 0.3, size=40))
    mean, var = torch.tensor(values[0]), torch.tensor(0.0, dtype=torch.float64)
    m, v = values[0], 0.0
    for x in values[1:]:
        mean, var = ema_moments(mean, var, torch.tensor(x), 0.9)
        m = 0.9 * m + 0.1 * x
        v = 0.9 * v + 0.1 * (x - m) ** 2
    assert math.isclose(float(mean), m, rel_tol=1e-12) and math.isclose(float(var), v, rel_tol=1e-12)
    assert math.isclose(float(zscore_threshold(mean, var, 2.5)), m + 2.5 * math.sqrt(v), rel_tol=1e-12)


def test_warmup_moments_are_numpys_mean_and_population_variance():
    values = np.array([[0.5, 3.0], [1.5, 3.0], [4.0, 3.0]])
    total, total_sq = torch.tensor(values.sum(0)), torch.tensor((values**2).sum(0))
    mean, var = warmup_moments(total, total_sq, torch.tensor([3.0, 3.0]))
    np.testing.assert_allclose(mean.numpy(), values.mean(0))
    np.testing.assert_allclose(var.numpy(), values.var(0), atol=1e-12)  # a constant column: exactly 0, not < 0
    assert (var >= 0).all()
    mean, var = warmup_moments(torch.zeros(1), torch.zeros(1), torch.zeros(1))  # nothing seen yet: zeros, not NaN
    assert mean.tolist() == [0.0] and var.tolist() == [0.0]


def test_depth_slope_is_the_least_squares_slope_of_log_norms():
    norms = torch.tensor([2.0, 1.1, 0.4, 0.3, 0.05])
    assert math.isclose(float(depth_slope(norms)), np.polyfit(np.arange(5), np.log(norms.numpy()), 1)[0],
                        rel_tol=1e-5)
    assert depth_slope(norms) < 0 < depth_slope(norms.flip(0))  # shrinking towards the input: vanishing
    assert depth_slope(torch.tensor([3.0])) == 0


def test_bad_arguments_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="positive number or inf"):
        tensor_norms(_tensors(), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile_threshold(torch.zeros(3, 1), 10.0)
    with pytest.raises(ValueError, match="clipping must be > 0"):
        agc_coefficient(torch.ones(2), torch.ones(2), clipping=0.0)

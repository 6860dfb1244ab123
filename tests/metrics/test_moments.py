"""Per-channel activation statistics against numpy/scipy references."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from traincraft.metrics.moments import (
    RunningMoments,
    batchnorm_gap,
    channel_percentiles,
    channels_first,
    dead_fraction,
    gaussian_w2,
    saturated_fraction,
    saturation_threshold,
    strided_subsample,
)


def _np_channels(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def test_running_moments_merge_batches_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 7 for b in (5, 1, 9)]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    ref = _np_channels(np.concatenate([b.numpy() for b in batches]))
    np.testing.assert_allclose(rm.mean.numpy(), ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(rm.std().numpy(), ref.std(1), rtol=1e-12)
    np.testing.assert_allclose(rm.var(unbiased=True).numpy(), ref.var(1, ddof=1), rtol=1e-12)
    assert rm.count.tolist() == [15 * 20] * 3


def test_running_moments_reject_a_change_of_width():
    rm = RunningMoments()
    rm.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="4 channels but earlier ones had 3"):
        rm.update(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="call update"):
        _ = RunningMoments().mean


def test_dead_and_saturated_fractions_match_the_outputs_of_the_nonlinearity():
    x = torch.randn(64, 6, 3, generator=torch.Generator().manual_seed(1)) * 4
    ref = _np_channels(x.numpy().astype(np.float64))
    np.testing.assert_allclose(dead_fraction(x).numpy(), (np.maximum(ref, 0) == 0).mean(1), rtol=1e-6)
    np.testing.assert_allclose(saturated_fraction(x, "tanh").numpy(), (np.abs(np.tanh(ref)) > 0.97).mean(1),
                               rtol=1e-6)
    sig = 1 / (1 + np.exp(-ref))
    np.testing.assert_allclose(saturated_fraction(x, "sigmoid").numpy(), ((sig < 0.03) | (sig > 0.97)).mean(1),
                               rtol=1e-6)
    assert saturation_threshold("sigmoid") == pytest.approx(math.log(0.97 / 0.03))
    with pytest.raises(ValueError, match="'tanh' and 'sigmoid'"):
        saturated_fraction(x, "relu")


def test_percentiles_match_numpy_on_the_strided_subsample():
    x = torch.randn(50, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    full = channel_percentiles(x, [15, 50, 85], max_values=10**6)
    np.testing.assert_allclose(full.numpy(), np.percentile(_np_channels(x.numpy()), [15, 50, 85], axis=1),
                               rtol=1e-5, atol=1e-6)
    sub = channel_percentiles(x, [15, 50, 85], max_values=300)
    stride = math.ceil(50 * 49 / 300)
    assert strided_subsample(x, 300).shape == (4, math.ceil(50 * 49 / stride))
    np.testing.assert_allclose(
        sub.numpy(), np.percentile(_np_channels(x.numpy())[:, ::stride], [15, 50, 85], axis=1), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"in \[0, 100\]"):
        channel_percentiles(x, [150])


def test_gaussian_w2_equals_the_quantile_integral():
    # W2² between 1-D laws is ∫₀¹ (F⁻¹(u) − G⁻¹(u))² du; integrate it numerically for Gaussians.
    u = (np.arange(200000) + 0.5) / 200000
    for (ma, sa, mb, sb) in [(0.0, 1.0, 0.5, 2.0), (3.0, 0.2, 2.0, 0.3)]:
        w2 = np.sqrt(np.mean((norm.ppf(u, ma, sa) - norm.ppf(u, mb, sb)) ** 2))
        got = gaussian_w2(*(torch.tensor([v], dtype=torch.float64) for v in (ma, sa, mb, sb)))
        assert got.item() == pytest.approx(w2 / math.sqrt((sa**2 + sb**2) / 2), rel=1e-3)


def test_batchnorm_gap_on_a_hand_made_case():
    gap, ratio = batchnorm_gap(torch.tensor([3.0, 2.0]), torch.tensor([4.0, 4.0]), torch.tensor([1.0, 2.0]),
                               torch.tensor([4.0, 1.0]), eps=0.0)
    assert gap.tolist() == [1.0, 0.0]
    assert ratio.tolist() == [1.0, 4.0]


def test_activations_without_a_channel_dimension_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, \*spatial\); got \(5,\)"):
        channels_first(torch.zeros(5))

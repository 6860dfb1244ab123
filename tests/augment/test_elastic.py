"""RandomElastic: the displacement field has the requested spread and smoothness, per sample, reproducibly."""

import numpy as np
import pytest
import torch
from kornia.geometry.transform import elastic_transform2d
from scipy.ndimage import map_coordinates

from traincraft.augment.elastic import RandomElastic


def _ramp(n: int, side: int) -> torch.Tensor:
    # pixel value = x / (side - 1): a bilinear warp of it reads the sampled x coordinate back exactly
    return torch.linspace(0, 1, side).expand(n, 1, side, side).contiguous()


def _displacement(op: RandomElastic, n: int, side: int) -> torch.Tensor:
    x = _ramp(n, side)
    margin = side // 4  # away from the zero padding at the borders
    return ((op(x) - x) * (side - 1) / side)[..., margin:-margin, margin:-margin]


@pytest.mark.parametrize("side", [32, 96])
def test_displacement_has_the_requested_standard_deviation_at_any_size(side):
    torch.manual_seed(0)
    shift = _displacement(RandomElastic(magnitude=0.03, smoothness=0.15), 64, side)
    assert shift.std().item() == pytest.approx(0.03, rel=0.15)


def test_the_field_is_smooth_over_the_requested_length():
    torch.manual_seed(1)
    side = 64
    shift = _displacement(RandomElastic(magnitude=0.03, smoothness=0.15), 64, side)[:, 0]

    def correlation(lag):  # the field has mean 0: no per-image centring, which would cut the long lags
        a, b = shift[:, :, :-lag], shift[:, :, lag:]
        return float((a * b).mean() / shift.square().mean())

    # Gaussian smoothing of white noise with σ px gives the correlation exp(-lag²/(4σ²))
    sigma = 0.15 * side
    for lag in (2, 6, 12):
        assert correlation(lag) == pytest.approx(np.exp(-(lag**2) / (4 * sigma**2)), abs=0.12)


def test_warp_equals_resampling_at_the_displaced_coordinates():
    torch.manual_seed(2)
    side = 24
    image = torch.rand(1, 1, side, side, dtype=torch.float64)
    op = RandomElastic(magnitude=0.05, smoothness=0.2)
    ramp_x = torch.linspace(0, 1, side, dtype=torch.float64).expand(1, 1, side, side)
    ramp_y = ramp_x.transpose(-1, -2)
    state = torch.get_rng_state()
    warped = op(image)
    torch.set_rng_state(state)  # the same field on the coordinate ramps
    sample_x = op(ramp_x.contiguous()) * (side - 1)
    torch.set_rng_state(state)
    noise = torch.rand(1, 2, side, side, dtype=torch.float64) * 2 - 1  # the draw the op made, both axes
    # the y coordinates: warp the y ramp by the same draw with the op's own field parameters
    size, sigma, alpha = op.field_parameters(side, side)
    sample_y = elastic_transform2d(ramp_y.contiguous(), noise, (size, size), (sigma, sigma), (alpha, alpha)) * (side - 1)
    margin = side // 4
    inner = (slice(margin, -margin), slice(margin, -margin))
    reference = map_coordinates(image[0, 0].numpy(), [sample_y[0, 0].numpy(), sample_x[0, 0].numpy()], order=1)
    np.testing.assert_allclose(warped[0, 0].numpy()[inner], reference[inner], atol=1e-6)


def test_only_selected_samples_change_and_draws_reproduce():
    x = torch.rand(64, 1, 16, 16)
    op = RandomElastic(magnitude=0.05, p=0.5)
    torch.manual_seed(3)
    a = op(x)
    torch.manual_seed(3)
    b = op(x)
    assert torch.equal(a, b)
    changed = (a != x).flatten(1).any(1)
    assert 16 <= int(changed.sum()) <= 48
    assert torch.equal(a[~changed], x[~changed])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magnitude": -0.1}, "magnitude must be >= 0"),
        ({"smoothness": 0.0}, r"smoothness must lie in \(0, 1\]"),
        ({"p": 1.5}, r"p must lie in \[0, 1\]"),
        ({"padding_mode": "wrap"}, "padding_mode must be"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomElastic(**kwargs)


def test_uint8_batches_are_rejected():
    with pytest.raises(ValueError, match="expects float images"):
        RandomElastic()(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))

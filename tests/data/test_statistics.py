import numpy as np
import pytest
import torch

from traincraft.data import channel_moments


def test_channel_moments_equal_numpy_whatever_the_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=g)
    ref = x.double().numpy() / 255.0
    mean_ref, std_ref = ref.mean(axis=(0, 2, 3)), ref.std(axis=(0, 2, 3))
    for chunks in (1, 4, 37):
        mean, std = channel_moments(x.tensor_split(chunks))
        np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-6)
        np.testing.assert_allclose(std.numpy(), std_ref, rtol=1e-6)


def test_channel_moments_rejects_empty_and_inconsistent_input():
    with pytest.raises(ValueError, match="empty data set"):
        channel_moments([])
    with pytest.raises(ValueError, match="channel count changed"):
        channel_moments([torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        channel_moments([torch.zeros(2, 2)])

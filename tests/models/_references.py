"""Slow, direct reference implementations the models are checked against."""

import torch
import torch.nn.functional as F

from traincraft.models import TwoColumnAlexNet


def paper_lrn(a: torch.Tensor, k=2.0, n=5, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """Krizhevsky et al. 2012, section 3.3, written out channel by channel."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo : hi + 1] ** 2).sum(1)) ** beta
    return out


def grouped_alexnet(model: TwoColumnAlexNet, x: torch.Tensor) -> torch.Tensor:
    """The same network as one grouped-convolution AlexNet (as in Caffe's), built from `model`'s weights."""
    cols = [model.columns["0"], model.columns["1"]]

    def stacked(layer: str, attr: str) -> torch.Tensor:
        return torch.cat([getattr(getattr(col, layer), attr) for col in cols], dim=0)

    def lrn_per_column(h: torch.Tensor) -> torch.Tensor:
        # Each GPU normalizes over its own maps only. One LRN over all channels would let the windows around the
        # last maps of column 0 also sum the first maps of column 1 (and vice versa), changing those outputs.
        halves = h.chunk(2, dim=1)
        return torch.cat(
            [F.local_response_norm(half, 5, alpha=5 * 1e-4, beta=0.75, k=2.0) for half in halves], 1
        )

    def conv(h: torch.Tensor, layer: str, groups: int, **kwargs) -> torch.Tensor:
        return F.relu(F.conv2d(h, stacked(layer, "weight"), stacked(layer, "bias"), groups=groups, **kwargs))

    conv1 = cols[0].conv1
    # Both columns' conv1 see every input channel, so a full convolution with the two filter banks stacked is
    # the grouped form (groups=2 over the input repeated twice would compute the same thing).
    h = conv(x, "conv1", 1, stride=conv1.stride, padding=conv1.padding)
    h = F.max_pool2d(lrn_per_column(h), 3, 2)
    h = F.max_pool2d(lrn_per_column(conv(h, "conv2", 2, padding=2)), 3, 2)
    h = conv(h, "conv3", 1, padding=1)  # the first cross-connection: a full convolution
    h = conv(h, "conv4", 2, padding=1)
    h = F.max_pool2d(conv(h, "conv5", 2, padding=1), 3, 2)
    h = torch.flatten(h, 1)
    h = F.relu(F.linear(h, stacked("fc6", "weight"), stacked("fc6", "bias")))
    h = F.relu(F.linear(h, stacked("fc7", "weight"), stacked("fc7", "bias")))
    return F.linear(h, stacked("fc8", "weight"), stacked("fc8", "bias"))

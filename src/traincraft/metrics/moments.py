"""Per-channel statistics of activations, computed on the device: running moments, dead and saturated
fractions, subsampled percentiles, and a normalized 2-Wasserstein distance between per-channel Gaussians.

An activation of shape ``(N, C)`` or ``(N, C, *spatial)`` is read as ``C`` channels, each with ``N * prod(spatial)``
values (the convention of batch normalization, whose statistics are per channel over batch and positions).
Nothing here copies to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional

import torch

#: Output magnitude beyond which a tanh unit counts as saturated, and a sigmoid unit within ``1 - 0.97`` of 0 or 1.
SATURATION_LEVEL = 0.97


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """View an activation ``(N, C)`` or ``(N, C, *spatial)`` as ``(C, N * prod(spatial))``.

    Example:
        >>> channels_first(torch.arange(12.0).reshape(2, 3, 2)).tolist()
        [[0.0, 1.0, 6.0, 7.0], [2.0, 3.0, 8.0, 9.0], [4.0, 5.0, 10.0, 11.0]]
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"an activation must be a tensor of shape (N, C) or (N, C, *spatial); got {shape}. Monitor layers whose "
            "inputs have a batch and a channel dimension."
        )
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations (``M2``) per channel, in float32 or wider."""
    return moments_of_rows(channels_first(x))


def moments_of_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`channel_moments` of values already laid out as ``(C, M)``."""
    v = v if v.dtype in (torch.float32, torch.float64) else v.float()
    count = torch.full((v.shape[0],), v.shape[1], dtype=v.dtype, device=v.device)
    var, mean = torch.var_mean(v, dim=1, correction=0)  # one fused pass
    return count, mean, var * v.shape[1]


def merge_moments(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine two ``(count, mean, M2)`` triples (Chan, Golub & LeVeque 1979): exact, and stable unlike sums of
    squares."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    safe = n.clamp_min(1)
    mean = mean_a + delta * n_b / safe
    m2 = m2_a + m2_b + delta.square() * n_a * n_b / safe
    return n, mean, m2


class RunningMoments:
    """Per-channel running mean and standard deviation, merged batch by batch on the device.

    Example:
        >>> rm = RunningMoments()
        >>> rm.update(torch.tensor([[0.0], [2.0]]))
        >>> rm.update(torch.tensor([[4.0]]))
        >>> rm.mean.tolist(), rm.std(unbiased=True).tolist()
        ([2.0], [2.0])
    """

    def __init__(self) -> None:
        self.state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def update(self, x: torch.Tensor) -> None:
        self.merge(channel_moments(x))

    def merge(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Add the ``(count, mean, M2)`` of a batch computed elsewhere."""
        if self.state is not None and self.state[1].shape != batch[1].shape:
            raise ValueError(
                f"RunningMoments: the activation has {batch[1].numel()} channels but earlier ones had "
                f"{self.state[1].numel()}; call reset() between layers of different widths."
            )
        self.state = batch if self.state is None else merge_moments(self.state, batch)

    def reset(self) -> None:
        self.state = None

    def _require(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.state is None:
            raise RuntimeError("RunningMoments holds no data yet: call update() first.")
        return self.state

    @property
    def count(self) -> torch.Tensor:
        return self._require()[0]

    @property
    def mean(self) -> torch.Tensor:
        return self._require()[1]

    def var(self, unbiased: bool = False) -> torch.Tensor:
        n, _, m2 = self._require()
        return m2 / (n - 1 if unbiased else n).clamp_min(1)

    def std(self, unbiased: bool = False) -> torch.Tensor:
        return self.var(unbiased).sqrt()


def dead_fraction(x: torch.Tensor) -> torch.Tensor:
    """Per channel, the fraction of a ReLU's inputs that are ``<= 0`` (the unit passes no gradient there)."""
    return (channels_first(x) <= 0).float().mean(dim=1)


def saturation_threshold(activation: Literal["tanh", "sigmoid"], level: float = SATURATION_LEVEL) -> float:
    """The input magnitude beyond which ``tanh`` reaches ``|y| > level``, or ``sigmoid`` comes within
    ``1 - level`` of 0 or 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"the saturation level must lie in (0, 1); got {level}.")
    if activation == "tanh":
        return math.atanh(level)
    if activation == "sigmoid":
        return math.log(level / (1.0 - level))
    raise ValueError(f"saturation is defined for 'tanh' and 'sigmoid'; got {activation!r}.")


def saturated_fraction(
    x: torch.Tensor, activation: Literal["tanh", "sigmoid"], level: float = SATURATION_LEVEL
) -> torch.Tensor:
    """Per channel, the fraction of a tanh's or sigmoid's *inputs* that drive it into saturation.

    Thresholding the input (``|x| > atanh(0.97)`` for tanh, ``|x| > logit(0.97)`` for sigmoid) is exactly
    equivalent to thresholding the output and needs no evaluation of the nonlinearity.
    """
    return (channels_first(x).abs() > saturation_threshold(activation, level)).float().mean(dim=1)


def strided_subsample(x: torch.Tensor, max_values: int) -> torch.Tensor:
    """``(C, M)`` values per channel reduced to at most ``max_values`` columns by an even stride.

    A stride, not random draws: the global random stream that training uses stays untouched, and there is no
    generator state to keep in step across ranks.
    """
    v = channels_first(x)
    if max_values <= 0:
        raise ValueError(f"max_values must be positive; got {max_values}.")
    stride = max(1, math.ceil(v.shape[1] / max_values))
    return v[:, ::stride]


def channel_percentiles(x: torch.Tensor, q: Sequence[float], max_values: int = 1024) -> torch.Tensor:
    """Percentiles ``q`` (in ``[0, 100]``) per channel, on at most ``max_values`` strided values per channel.

    Returns ``(len(q), C)``; percentiles interpolate linearly, as ``numpy.percentile`` does by default.
    """
    if not q or any(not 0.0 <= p <= 100.0 for p in q):
        raise ValueError(f"percentiles must be a non-empty list of numbers in [0, 100]; got {list(q)}.")
    return quantiles_of_rows(strided_subsample(x, max_values).float(), [p / 100.0 for p in q])


def quantiles_of_rows(v: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Quantiles ``probs`` of each row of ``v`` ``(C, M)``, interpolated as ``numpy.quantile``; returns
    ``(len(probs), C)``. One sort and a gather: several times faster than ``torch.quantile`` on small rows."""
    ordered = v.sort(dim=1).values
    last = v.shape[1] - 1
    out = []
    for p in probs:  # positions are host numbers: no synchronization
        pos = p * last
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        hi = min(lo + 1, last)
        out.append(ordered[:, lo] * (1.0 - frac) + ordered[:, hi] * frac)
    return torch.stack(out)


def gaussian_w2(
    mean_a: torch.Tensor, std_a: torch.Tensor, mean_b: torch.Tensor, std_b: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-channel 2-Wasserstein distance between ``N(mean_a, std_a²)`` and ``N(mean_b, std_b²)``, divided by the
    root mean square of the two standard deviations, so that it does not depend on the scale of the layer.

    For 1-D Gaussians ``W2² = (μa − μb)² + (σa − σb)²``; the normalized distance is ``W2 / sqrt((σa² + σb²) / 2)``.

    Example:
        >>> gaussian_w2(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0])).tolist()
        [1.0]
    """
    w2 = ((mean_a - mean_b).square() + (std_a - std_b).square()).sqrt()
    scale = ((std_a.square() + std_b.square()) / 2).sqrt()
    return w2 / (scale + eps)


def batchnorm_gap(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far a batch's per-channel statistics lie from a BatchNorm layer's running estimates.

    Returns ``(mean_gap, var_ratio)`` per channel: ``|μ_B − μ_run| / sqrt(σ²_run + eps)`` (the batch-mean offset in
    running standard deviations) and ``σ²_B / (σ²_run + eps)``. ``batch_var`` should be the unbiased variance, as
    BatchNorm's running variance tracks the unbiased estimate. At ``(0, 1)`` evaluation normalizes exactly as
    training did.

    Example:
        >>> gap, ratio = batchnorm_gap(torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0]),
        ...                            torch.tensor([4.0]), eps=0.0)
        >>> gap.tolist(), ratio.tolist()
        ([1.0], [1.0])
    """
    denominator = running_var.float() + eps
    return (batch_mean - running_mean).abs() / denominator.sqrt(), batch_var / denominator

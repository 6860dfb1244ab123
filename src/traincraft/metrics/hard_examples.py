"""The maths of hard-example sampling: per-example loss EMA, capped sampling probabilities, seeded draws.

Pure functions on tensors; :class:`~traincraft.data.HardExampleSampler` holds the state and
:class:`~traincraft.callbacks.HardExampleMining` drives it from a ``Trainer``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def check_hard_example_args(
    decay: float, cap: float, uniform_mix: float, temperature: float, warmup_epochs: int
) -> None:
    """Raise a ``ValueError`` that says how to fix an invalid hard-example sampling setting."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"decay must lie in [0, 1); got {decay!r}. It weighs the previous loss average against this epoch's "
            "losses: 0 keeps only the latest epoch, 0.9 averages over about 10 epochs."
        )
    if not cap >= 1.0:  # also rejects NaN
        raise ValueError(
            f"cap must be >= 1 (the largest allowed probability as a multiple of the uniform 1/N; math.inf for no "
            f"cap); got {cap!r}. cap=1 is uniform sampling, 5 lets an example be drawn at most 5x as often."
        )
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(
            f"uniform_mix must lie in [0, 1] (the share of uniform sampling mixed in, a floor under every "
            f"example); got {uniform_mix!r}."
        )
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a positive finite number; got {temperature!r}. Probabilities follow "
            "loss ** (1 / temperature): 1 is proportional to the loss, larger values flatten it."
        )
    if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an integer >= 0; got {warmup_epochs!r}.")


def fill_unseen(loss_ema: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Give examples without a loss yet the mean of the seen ones (all equal when none was seen).

    Example:
        >>> fill_unseen(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([True, False, True]))
        tensor([1., 2., 3.])
    """
    if loss_ema.shape != seen.shape:
        raise ValueError(f"loss_ema {tuple(loss_ema.shape)} and seen {tuple(seen.shape)} must have the same shape.")
    count = seen.sum()
    mean = torch.where(seen, loss_ema, 0).sum() / count.clamp_min(1)
    return torch.where(seen, loss_ema, torch.where(count > 0, mean, torch.ones_like(mean)))


def update_loss_ema(
    loss_ema: torch.Tensor, seen: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's update of the per-example loss EMA; returns ``(loss_ema, seen)``.

    An example with ``counts > 0`` this epoch takes the mean of its losses (an example drawn twice averages both);
    the first observation sets its EMA, later ones blend in: ``decay * ema + (1 - decay) * mean``. Examples not
    drawn this epoch keep their value.

    Example:
        >>> ema, seen = update_loss_ema(torch.tensor([2.0, 5.0, 0.0]), torch.tensor([True, True, False]),
        ...                             sums=torch.tensor([3.0, 0.0, 4.0]), counts=torch.tensor([2.0, 0.0, 1.0]),
        ...                             decay=0.5)
        >>> ema, seen
        (tensor([1.7500, 5.0000, 4.0000]), tensor([True, True, True]))
    """
    now = counts > 0
    mean = sums / counts.clamp_min(1)
    blended = torch.where(seen, decay * loss_ema + (1.0 - decay) * mean, mean)
    return torch.where(now, blended, loss_ema), seen | now


def cap_probabilities(probabilities: torch.Tensor, cap: float) -> torch.Tensor:
    """Clip probabilities at ``cap / N`` and hand the excess to the others in proportion to their probability.

    The result is ``min(cap / N, s * p)`` with the one scale ``s >= 1`` that makes it sum to 1 (water-filling),
    found exactly from the sorted probabilities in ``O(N log N)``. When too few examples have a positive
    probability to carry the mass (possible only without a uniform floor), the rest is shared equally by the others.

    Example:
        >>> cap_probabilities(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), cap=1.5)
        tensor([0.5000, 0.3333, 0.1667], dtype=torch.float64)
    """
    p = probabilities.double()
    n = p.numel()
    limit = cap / n
    if cap <= 1.0:
        return torch.full_like(p, 1.0 / n)
    if bool(p.max() <= limit):
        return p
    positive = int((p > 0).sum())
    if positive * limit < 1.0:  # even capping every positive one leaves mass over: spread it over the zeros
        return torch.where(p > 0, torch.full_like(p, limit), torch.full_like(p, (1.0 - positive * limit) / (n - positive)))
    ordered = p.sort(descending=True).values
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[k]: mass of all but the k largest
    k = torch.arange(n, dtype=p.dtype)
    scale = (1.0 - k * limit) / tail
    # With the k largest capped, the rest scaled by scale[k]: the first k at which the largest uncapped one fits
    # under the cap is the water-filling solution (ties and zeros included; tail > 0 up to the last positive one).
    fits = (ordered * scale <= limit * (1.0 + 1e-12)) & (tail > 0)
    first = int(fits.nonzero()[0, 0])
    return torch.clamp(p * scale[first], max=limit)


def hard_example_probabilities(
    loss_ema: torch.Tensor,
    cap: float = 5.0,
    uniform_mix: float = 0.2,
    temperature: float = 1.0,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampling probabilities (float64, summing to 1) from per-example losses.

    ``p ∝ loss ** (1 / temperature)``, mixed with the uniform distribution (``(1 - uniform_mix) p + uniform_mix /
    N``: no example is starved), then capped at ``cap / N`` with the excess redistributed
    (:func:`cap_probabilities`): no outlier can dominate the epoch. Examples not yet ``seen`` count as the mean loss.

    Args:
        loss_ema: non-negative per-example losses ``(N,)`` (their moving averages).
        cap: largest probability as a multiple of the uniform ``1 / N``; ``>= 1`` (``math.inf``: no cap).
        uniform_mix: share of uniform sampling in ``[0, 1]``.
        temperature: ``> 0``; larger flattens the dependence on the loss.
        seen: which examples have a loss; ``None``: all.

    Example:
        >>> hard_example_probabilities(torch.tensor([1.0, 1.0, 2.0, 100.0]), cap=2.0, uniform_mix=0.0)
        tensor([0.1250, 0.1250, 0.2500, 0.5000], dtype=torch.float64)
    """
    check_hard_example_args(0.0, cap, uniform_mix, temperature, 0)
    if loss_ema.ndim != 1 or loss_ema.numel() == 0:
        raise ValueError(f"loss_ema must be a non-empty vector (N,); got shape {tuple(loss_ema.shape)}.")
    losses = loss_ema.detach().double().cpu()
    bad = ~torch.isfinite(losses) | (losses < 0)
    if seen is not None:
        seen = seen.cpu()
        bad &= seen
        losses = fill_unseen(losses, seen)
    if bool(bad.any()):
        where = bad.nonzero()[:5, 0].tolist()
        raise ValueError(
            f"per-example losses must be finite and >= 0 to become probabilities; {int(bad.sum())} are not (e.g. "
            f"examples {where}: {losses[where].tolist()}). Return a non-negative loss per example (cross-entropy is)."
        )
    n = losses.numel()
    top = losses.max()
    if bool(top > 0):
        weights = (losses / top).pow(1.0 / temperature)  # scaled first: no overflow for small temperatures
        p = weights / weights.sum()
    else:
        p = torch.full_like(losses, 1.0 / n)
    p = (1.0 - uniform_mix) * p + uniform_mix / n
    return cap_probabilities(p, cap)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's draws: the same on every rank, different for every ``(seed, epoch)``."""
    state = np.random.SeedSequence([seed, epoch, 0x4A5D]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def sample_indices(probabilities: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with replacement from ``probabilities`` (inverse CDF in float64; any ``N``).

    Example:
        >>> sample_indices(torch.tensor([0.0, 1.0, 0.0]), 4, torch.Generator().manual_seed(0))
        tensor([1, 1, 1, 1])
    """
    cdf = probabilities.double().cpu().cumsum(0)
    cdf = cdf / cdf[-1]
    uniform = torch.rand(count, dtype=torch.float64, generator=generator)
    return torch.searchsorted(cdf, uniform, right=True).clamp_(max=probabilities.numel() - 1)


def sampling_summary(probabilities: torch.Tensor, cap: float) -> dict[str, torch.Tensor]:
    """How far a sampling distribution is from uniform: largest and smallest ratio ``p·N``, the fraction of
    examples at the cap, and the effective sample size ``1 / Σp²`` as a fraction of ``N``.

    Example:
        >>> {k: round(float(v), 3) for k, v in sampling_summary(torch.tensor([0.5, 0.25, 0.25]), cap=1.5).items()}
        {'max_ratio': 1.5, 'min_ratio': 0.75, 'capped_fraction': 0.333, 'ess_fraction': 0.889}
    """
    p = probabilities.double()
    n = p.numel()
    at_cap = p >= (cap / n) * (1.0 - 1e-9) if math.isfinite(cap) else torch.zeros_like(p, dtype=torch.bool)
    return {
        "max_ratio": p.max() * n,
        "min_ratio": p.min() * n,
        "capped_fraction": at_cap.double().mean(),
        "ess_fraction": 1.0 / (p.square().sum() * n),
    }

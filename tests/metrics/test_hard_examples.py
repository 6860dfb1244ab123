"""The maths of hard-example sampling: probabilities against a numpy water-filling reference, the edge cases, the
summary of a distribution and seeded draws whose frequencies converge to the probabilities."""

import math

import numpy as np
import pytest
import torch

from traincraft.metrics.hard_examples import (
    cap_probabilities,
    hard_example_probabilities,
    sample_indices,
    sampling_summary,
)


def _reference_cap(p: np.ndarray, cap: float) -> np.ndarray:
    """Iterative water-filling: clip what exceeds cap/N, give the excess to the rest in proportion, repeat."""
    p = p.astype(np.float64).copy()
    limit = cap / len(p)
    capped = np.zeros(len(p), dtype=bool)
    for _ in range(len(p) + 1):
        free = 1.0 - limit * capped.sum()
        rest = np.where(capped, 0.0, p)
        q = np.where(capped, limit, rest * free / rest.sum())
        over = (q > limit * (1 + 1e-12)) & ~capped
        if not over.any():
            return q
        capped |= over
    raise AssertionError("water-filling did not converge")


def _reference_probabilities(losses, seen, cap, mix, temperature) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    seen = np.asarray(seen, dtype=bool)
    losses = np.where(seen, losses, losses[seen].mean() if seen.any() else 1.0)
    w = losses ** (1.0 / temperature)
    p = w / w.sum()
    p = (1 - mix) * p + mix / len(p)
    return _reference_cap(p, cap)


@pytest.mark.parametrize("cap,mix,temperature", [(5.0, 0.2, 1.0), (2.0, 0.0, 1.0), (3.0, 0.5, 0.5), (10.0, 0.1, 2.0),
                                                 (1.5, 0.05, 0.25)])
def test_probabilities_equal_the_numpy_water_filling_reference(cap, mix, temperature):
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(200, generator=generator).pow(4) * 5  # heavy right tail: several examples hit the cap
    losses[:3] = torch.tensor([500.0, 400.0, 300.0])
    seen = torch.rand(200, generator=generator) > 0.2
    seen[:3] = True
    p = hard_example_probabilities(losses, cap=cap, uniform_mix=mix, temperature=temperature, seen=seen)
    expected = _reference_probabilities(losses.double().numpy(), seen.numpy(), cap, mix, temperature)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-10, atol=1e-15)
    assert p.dtype == torch.float64
    assert abs(float(p.sum()) - 1.0) < 1e-12
    assert float(p.max()) <= cap / 200 * (1 + 1e-12)
    assert float(p.min()) >= mix / 200 * (1 - 1e-12)  # the uniform floor survives the redistribution
    assert int((p >= cap / 200 * (1 - 1e-9)).sum()) >= 3  # the test exercises the cap


def test_capping_matches_the_reference_with_ties_and_zeros():
    generator = torch.Generator().manual_seed(1)
    for trial in range(300):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        raw = torch.randint(0, 6, (n,), generator=generator).double() ** 3  # ties and zeros
        if raw.sum() == 0:
            raw[0] = 1.0
        p = raw / raw.sum()
        cap = float(torch.empty(1).uniform_(1.0, 4.0, generator=generator))
        if int((p > 0).sum()) * cap / n < 1:
            continue  # infeasible for proportional water-filling: tested separately below
        np.testing.assert_allclose(cap_probabilities(p, cap).numpy(), _reference_cap(p.numpy(), cap), rtol=1e-10,
                                   atol=1e-15, err_msg=f"trial {trial}: p={p.tolist()}, cap={cap}")


def test_edge_cases():
    # all losses equal: exactly uniform, whatever the settings
    p = hard_example_probabilities(torch.full((7,), 0.3), cap=3.0, uniform_mix=0.0, temperature=0.5)
    torch.testing.assert_close(p, torch.full((7,), 1 / 7, dtype=torch.float64), rtol=0, atol=1e-16)
    # one huge outlier: exactly at the cap, the rest share the remainder equally
    losses = torch.ones(10)
    losses[4] = 1e6
    p = hard_example_probabilities(losses, cap=3.0, uniform_mix=0.1)
    assert float(p[4]) == pytest.approx(0.3, abs=1e-15)
    torch.testing.assert_close(p[torch.arange(10) != 4], torch.full((9,), 0.7 / 9, dtype=torch.float64))
    # never-seen examples count as the mean of the seen ones
    p = hard_example_probabilities(torch.tensor([1.0, 3.0, 0.0, 123.0]), cap=math.inf, uniform_mix=0.0,
                                   seen=torch.tensor([True, True, False, False]))
    torch.testing.assert_close(p, torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64) / 8)
    # nothing seen yet, cap 1, or all-zero losses: uniform
    assert torch.equal(hard_example_probabilities(torch.zeros(4), seen=torch.zeros(4, dtype=torch.bool)),
                       torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(hard_example_probabilities(torch.arange(4.0), cap=1.0), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(hard_example_probabilities(torch.zeros(4), uniform_mix=0.0), torch.full((4,), 0.25, dtype=torch.float64))
    # no uniform floor and too few positive examples to carry the mass under the cap: the zeros share the rest
    p = hard_example_probabilities(torch.tensor([5.0, 0.0, 0.0, 0.0]), cap=2.0, uniform_mix=0.0)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3], dtype=torch.float64))


def test_summary_of_a_distribution():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    summary = sampling_summary(p, cap=1.6)
    assert float(summary["max_ratio"]) == pytest.approx(1.6)
    assert float(summary["min_ratio"]) == pytest.approx(0.4)
    assert float(summary["capped_fraction"]) == 0.25
    assert float(summary["ess_fraction"]) == pytest.approx(1 / (0.3 * 4))


def test_sampling_frequencies_converge_to_the_probabilities():
    losses = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0])
    p = hard_example_probabilities(losses, cap=3.0, uniform_mix=0.1)
    draws = 400_000
    counts = torch.bincount(sample_indices(p, draws, torch.Generator().manual_seed(3)), minlength=8).double()
    sigma = (p * (1 - p) / draws).sqrt()
    deviation = (counts / draws - p).abs() / sigma
    assert float(deviation.max()) < 5, deviation  # fails for a sampler off by more than ~0.3% of these p
    assert float(((p - 1 / 8).abs() / sigma).max()) > 100  # ... and uniform sampling would be far outside

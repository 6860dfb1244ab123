"""Update statistics against plain numpy references."""

import numpy as np
import pytest
import torch

from traincraft.metrics.updates import (
    adam_effective_lr,
    sign_flip_fraction,
    update_cosine,
    update_weight_ratio,
)


def _pair(seed=0, n=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def test_update_weight_ratio_matches_numpy_over_a_list_of_tensors():
    g = torch.Generator().manual_seed(1)
    updates = [torch.randn(3, 4, generator=g) * 1e-3, torch.randn(7, generator=g) * 1e-3]
    weights = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g)]
    u = np.concatenate([t.numpy().ravel() for t in updates])
    w = np.concatenate([t.numpy().ravel() for t in weights])
    expected = np.linalg.norm(u) / np.linalg.norm(w)
    assert update_weight_ratio(updates, weights).item() == pytest.approx(expected, rel=1e-5)
    flat = update_weight_ratio(torch.from_numpy(u), torch.from_numpy(w))
    assert flat.item() == pytest.approx(expected, rel=1e-5)


def test_update_cosine_matches_numpy_and_handles_zero_updates():
    a, b = _pair()
    expected = float(np.dot(a.numpy(), b.numpy()) / np.linalg.norm(a.numpy()) / np.linalg.norm(b.numpy()))
    assert update_cosine(a, b).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert update_cosine(a, -a).item() == pytest.approx(-1.0)
    assert update_cosine(a, 2 * a).item() == pytest.approx(1.0)
    assert update_cosine(a, torch.zeros_like(a)).item() == 0.0


def test_sign_flip_fraction_matches_numpy():
    a, b = _pair(2)
    a[:10] = 0.0
    expected = float(np.mean(np.sign(a.numpy()) * np.sign(b.numpy()) < 0))
    assert sign_flip_fraction(a, b).item() == pytest.approx(expected)
    assert sign_flip_fraction(a, -a).item() == pytest.approx(990 / 1000)


def test_adam_effective_lr_is_the_step_adam_takes_once_its_moments_are_equal():
    """After one Adam step from zero state, |Δθ| = lr·|m̂|/(√v̂+ε) = lr·|g|/(|g|+ε): check against torch.optim.Adam."""
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    w.grad = torch.tensor([0.01, -4.0, 0.5])
    before = w.detach().clone()
    opt.step()
    state = opt.state[w]
    rates = adam_effective_lr(0.1, state["exp_avg_sq"], state["step"], 0.99, 1e-3)
    m_hat = state["exp_avg"] / (1 - 0.9)
    torch.testing.assert_close(before - w.detach(), rates * m_hat)


def test_mismatched_shapes_are_rejected_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        update_cosine(torch.zeros(3), torch.zeros(4))


def test_update_agreement_equals_the_separate_functions():
    from traincraft.metrics.updates import update_agreement

    a, b = _pair(3)
    cosine, flips, square = update_agreement(a, b, torch.dot(b, b))
    assert cosine.item() == pytest.approx(update_cosine(a, b).item(), rel=1e-5)
    assert flips.item() == pytest.approx(sign_flip_fraction(a, b).item())
    assert square.item() == pytest.approx(float(np.dot(a.numpy(), a.numpy())), rel=1e-5)


def test_update_agreement_counts_flips_exactly_with_zeros_and_negative_zeros_in_a_workspace():
    from traincraft.metrics.updates import update_agreement

    rng = np.random.default_rng(7)
    a = rng.standard_normal(10_001).astype(np.float32)
    b = rng.standard_normal(10_001).astype(np.float32)
    a[::7], b[::11] = 0.0, -0.0  # zero updates: 0·(-x) and (-0)·x give -0.0, which is no flip
    reference = float(np.mean((a.astype(np.float64) * b) < 0))
    previous = torch.from_numpy(b.copy())
    _, flips, _ = update_agreement(torch.from_numpy(a), previous, torch.dot(previous, previous), workspace=previous)
    assert flips.item() == pytest.approx(reference, abs=1e-7)
    assert flips.item() * a.size == pytest.approx(round(reference * a.size), abs=1e-3)


def test_update_agreement_rejects_a_workspace_of_another_shape():
    from traincraft.metrics.updates import update_agreement

    with pytest.raises(ValueError, match=r"workspace must be a float tensor of shape \(3,\)"):
        update_agreement(torch.ones(3), torch.ones(3), torch.tensor(3.0), workspace=torch.empty(4))

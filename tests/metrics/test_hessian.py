"""Curvature estimators against dense Hessians (torch.autograd.functional.hessian) and closed forms."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.helpers import count_host_syncs
from traincraft.metrics.hessian import (
    directional_curvature,
    effective_rate_diagonal,
    extreme_eigenpairs,
    flatten,
    hessian_vector_operator,
    hutchinson_trace,
    lanczos,
    module_without_double_backward,
    power_iteration,
    scaled_operator,
    stability_threshold,
)


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return net, x, y


def _dense_hessian(net, x, y):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    numels = [p.numel() for p in net.parameters()]

    def loss_of(flat):
        params = {n: piece.view(s) for n, piece, s in zip(names, flat.split(numels), shapes, strict=False)}
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    flat = flatten(list(net.parameters())).detach()
    return torch.autograd.functional.hessian(loss_of, flat)


def _operator(net, x, y):
    return hessian_vector_operator(F.cross_entropy(net(x), y), list(net.parameters()))


def test_power_iteration_lambda_max_within_one_percent_of_the_dense_hessian():
    net, x, y = _tiny_problem()
    eigenvalues = torch.linalg.eigvalsh(_dense_hessian(net, x, y))
    top = eigenvalues[-1].item()
    assert top > abs(eigenvalues[0].item())  # the top eigenvalue is the one of largest magnitude here
    hvp, _ = _operator(net, x, y)
    value, vector = power_iteration(hvp, torch.randn(eigenvalues.numel()), iterations=100)
    assert value.item() == pytest.approx(top, rel=0.01)
    assert torch.linalg.vector_norm(vector).item() == pytest.approx(1.0, rel=1e-5)


def test_warm_start_needs_only_a_few_iterations_after_a_training_step():
    net, x, y = _tiny_problem(1)
    hvp, grad = _operator(net, x, y)
    _, vector = power_iteration(hvp, torch.randn(grad.numel()), iterations=100)
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    with torch.no_grad():  # one SGD step: the top eigenvector moves a little
        for p, g in zip(net.parameters(), grads, strict=False):
            p -= 0.1 * g
    top = torch.linalg.eigvalsh(_dense_hessian(net, x, y))[-1].item()
    hvp, _ = _operator(net, x, y)
    warm, _ = power_iteration(hvp, vector, iterations=5)
    assert warm.item() == pytest.approx(top, rel=0.01)


def test_eta_opt_is_one_over_lambda_on_a_quadratic():
    """On L = ½ wᵀAw a gradient step of η = 1/λ_max lands exactly at the minimum along the top eigenvector."""
    eigenvalues = torch.tensor([5.0, 2.0, 0.5])
    basis, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    a = basis @ torch.diag(eigenvalues) @ basis.T
    w = nn.Parameter(basis[:, 0] * 3.0)  # displaced along the sharpest direction
    hvp, _ = hessian_vector_operator(0.5 * w @ a @ w, [w])
    lam, _ = power_iteration(hvp, torch.ones(3), iterations=200)
    assert lam.item() == pytest.approx(5.0, rel=1e-4)
    eta_opt = 1.0 / lam.item()
    opt = torch.optim.SGD([w], lr=eta_opt)
    (0.5 * w @ a @ w).backward()
    opt.step()
    assert torch.linalg.vector_norm(w.detach()).item() < 1e-4


def test_hutchinson_trace_against_the_dense_trace():
    net, x, y = _tiny_problem(2)
    dense = _dense_hessian(net, x, y)
    hvp, grad = _operator(net, x, y)
    samples = 400
    estimate = hutchinson_trace(hvp, grad.numel(), samples, torch.Generator().manual_seed(0)).item()
    off_diagonal = dense - torch.diag(torch.diag(dense))
    std_error = math.sqrt(2 * (off_diagonal**2).sum().item() / samples)  # Var(zᵀHz) = 2 Σ_{i≠j} H_ij²
    assert abs(estimate - torch.trace(dense).item()) < 4 * std_error + 1e-6


def test_directional_curvature_against_the_dense_hessian():
    net, x, y = _tiny_problem(3)
    dense = _dense_hessian(net, x, y)
    hvp, grad = _operator(net, x, y)
    expected = (grad @ dense @ grad / (grad @ grad)).item()
    assert directional_curvature(hvp, grad).item() == pytest.approx(expected, rel=1e-4)
    lam = torch.linalg.eigvalsh(dense)[-1].item()
    assert directional_curvature(hvp, grad).item() <= lam * (1 + 1e-5)


def _diverges(optimizer_factory, lam, steps=400):
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = optimizer_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * w**2).sum().backward()
        opt.step()
    return abs(w.item()) > 1.0


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.5, False), (0.9, True), (0.5, True)])
def test_sgd_thresholds_match_simulated_divergence_on_a_quadratic(momentum, nesterov):
    lr = 0.1
    sgd = functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov)
    threshold = stability_threshold(sgd([nn.Parameter(torch.zeros(1))]))
    critical_lambda = threshold / lr
    assert not _diverges(sgd, 0.98 * critical_lambda)
    assert _diverges(sgd, 1.02 * critical_lambda)


def test_adam_threshold_is_the_published_38_and_unknown_optimizers_have_none():
    p = [nn.Parameter(torch.zeros(1))]
    assert stability_threshold(torch.optim.Adam(p, betas=(0.9, 0.999))) == pytest.approx(38.0)
    assert stability_threshold(torch.optim.AdamW(p, betas=(0.5, 0.999))) == pytest.approx(6.0)
    assert stability_threshold(torch.optim.Adadelta(p)) is None


def test_preconditioned_operator_has_the_eigenvalues_of_eta_p_inverse_h():
    net, x, y = _tiny_problem(4)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    diagonal = effective_rate_diagonal(opt, params)
    v = flatten([opt.state[p]["exp_avg_sq"] for p in params]) / (1 - 0.99**3)
    torch.testing.assert_close(diagonal, 0.01 / (v.sqrt() + 1e-6))
    dense = _dense_hessian(net, x, y)
    expected = torch.linalg.eigvals(torch.diag(diagonal) @ dense).real.max().item()  # η·λ_max(P⁻¹H)
    hvp, _ = _operator(net, x, y)
    value, _ = power_iteration(scaled_operator(hvp, diagonal), torch.randn(diagonal.numel()), iterations=300)
    assert value.item() == pytest.approx(expected, rel=0.01)


class _OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_model_without_double_backward_gets_a_clear_error():
    w = nn.Parameter(torch.randn(3))
    loss = _OnceDifferentiableSquare.apply(w).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        hvp, _ = hessian_vector_operator(loss, [w])
        hvp(torch.ones(3))


def test_weights_changed_after_the_operator_was_built_get_their_own_error():
    w = nn.Parameter(torch.randn(3))
    hvp, _ = hessian_vector_operator((w**3).sum(), [w])
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step between building the operator and using it
    with pytest.raises(RuntimeError, match="changed in place after this Hessian-vector operator was built"):
        hvp(torch.ones(3))


# --- both ends of the spectrum: Lanczos against dense Hessians -------------------------------------------------


def _tiny_transformer(seed=0):
    """Lightning's demo LM on random tokens: at initialization |λ_min| > λ_max, where power iteration goes wrong."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(seed)
    model = Transformer(vocab_size=8, ninp=4, nhead=2, nhid=4, nlayers=1, dropout=0.0)
    tokens, targets = torch.randint(0, 8, (4, 5)), torch.randint(0, 8, (4, 5))
    return model, lambda m, params=None: F.nll_loss(
        m(tokens, tokens) if params is None else functional_call(m, params, (tokens, tokens)), targets.view(-1))


def _dense_eigenvalues(model, loss_of_model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]

    def loss_of(flat):
        return loss_of_model(model, {n: piece.view(s) for n, piece, s in zip(names, flat.split(numels), shapes,
                                                                               strict=True)})

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        dense = torch.func.hessian(loss_of)(flatten(list(model.parameters())).detach())
    return torch.linalg.eigvalsh(dense.double())


def _transformer_operator(model, loss_of_model):
    with sdpa_kernel(SDPBackend.MATH):
        return hessian_vector_operator(loss_of_model(model), list(model.parameters()))


def test_lanczos_finds_both_ends_where_power_iteration_finds_the_negative_one():
    model, loss_of = _tiny_transformer(2)
    eigenvalues = _dense_eigenvalues(model, loss_of)
    low, high = eigenvalues[0].item(), eigenvalues[-1].item()
    assert -low > 1.1 * high > 0  # a saddle-like point: the largest magnitude is negative
    hvp, grad = _transformer_operator(model, loss_of)
    start = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(1))
    power, _ = power_iteration(hvp, start, iterations=40)
    assert power.item() == pytest.approx(low, rel=0.02)  # the bug this replaces: "sharpness" < 0
    pairs = lanczos(hvp, start, iterations=20, generator=torch.Generator().manual_seed(0))
    assert pairs.lambda_max.item() == pytest.approx(high, rel=0.02)
    assert pairs.lambda_min.item() == pytest.approx(low, rel=0.02)
    with_gradient = lanczos(hvp, start, iterations=20, generator=torch.Generator().manual_seed(0), also=grad)
    assert with_gradient.lambda_max.item() == pytest.approx(high, rel=0.02)
    expected = directional_curvature(hvp, grad).item()  # gᵀHg/‖g‖² with a product of its own
    assert with_gradient.quotient.item() == pytest.approx(expected, rel=1e-4, abs=1e-5 * abs(low))
    for value, vector in ((pairs.lambda_max, pairs.vector_max), (pairs.lambda_min, pairs.vector_min)):
        assert torch.linalg.vector_norm(vector).item() == pytest.approx(1.0, rel=1e-4)
        residual = torch.linalg.vector_norm(hvp(vector) - value * vector).item()
        assert residual < 0.05 * abs(low)  # Ritz pairs, not just values


def test_lanczos_warm_start_after_training_steps_needs_few_products():
    model, loss_of = _tiny_transformer(1)
    hvp, grad = _transformer_operator(model, loss_of)
    generator = torch.Generator().manual_seed(0)
    previous = lanczos(hvp, torch.randn(grad.numel(), generator=generator), 20, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        with sdpa_kernel(SDPBackend.MATH):
            loss_of(model).backward()
        optimizer.step()
    eigenvalues = _dense_eigenvalues(model, loss_of)
    hvp, _ = _transformer_operator(model, loss_of)
    warm = lanczos(hvp, previous.vector_max + previous.vector_min, 8, generator)
    assert warm.lambda_max.item() == pytest.approx(eigenvalues[-1].item(), rel=0.02)
    spectral_radius = eigenvalues.abs().max().item()
    assert abs(warm.lambda_min.item() - eigenvalues[0].item()) < 0.02 * spectral_radius


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extreme_eigenpairs_match_eigh_without_a_host_sync(seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    matrix = a + a.T
    matrix[0, 0] -= 30.0  # a dominant negative end, as at a saddle
    low, high, v_low, v_high = extreme_eigenpairs(matrix)
    values, vectors = torch.linalg.eigh(matrix)
    torch.testing.assert_close(low, values[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(high, values[-1], rtol=1e-9, atol=1e-9)
    assert abs(torch.dot(v_low, vectors[:, 0]).item()) == pytest.approx(1.0, abs=1e-8)
    assert abs(torch.dot(v_high, vectors[:, -1]).item()) == pytest.approx(1.0, abs=1e-8)


def test_lanczos_runs_without_host_syncs():
    a = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    counts, enabled = {}, [True]
    with count_host_syncs(counts, enabled):
        lanczos(lambda v: (a + a.T) @ v, torch.ones(30), 10, torch.Generator().manual_seed(0))
    assert counts == {}


def test_lanczos_survives_an_invariant_start_and_more_iterations_than_dimensions():
    diagonal = torch.tensor([3.0, 3.0, 3.0, -1.0, 0.5])
    # e0 is an eigenvector: its Krylov space breaks down after one vector, the rest must come from fresh directions
    pairs = lanczos(lambda v: diagonal * v, torch.eye(5)[0], iterations=50, generator=torch.Generator().manual_seed(0))
    assert pairs.lambda_max.item() == pytest.approx(3.0, abs=1e-5)
    assert pairs.lambda_min.item() == pytest.approx(-1.0, abs=1e-5)
    identity = lanczos(lambda v: 2 * v, torch.ones(4), iterations=3, generator=torch.Generator().manual_seed(0))
    assert identity.lambda_min.item() == pytest.approx(2.0) and identity.lambda_max.item() == pytest.approx(2.0)


class _Squarer(nn.Module):
    def forward(self, x):
        return _OnceDifferentiableSquare.apply(x)


def test_the_module_without_double_backward_is_named():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Sequential(nn.Linear(4, 4), _Squarer()),
                        nn.Linear(4, 1))
    x = torch.randn(5, 3)
    assert module_without_double_backward(net, lambda: net(x).sum()) == "2.1"
    healthy = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    assert module_without_double_backward(healthy, lambda: healthy(x).sum()) is None

"""suggest_learning_rate / lr_from_curvature against closed forms on a quadratic (least squares), the module left
untouched, and the refusals."""

from __future__ import annotations

import copy
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traincraft.metrics.hessian import DoubleBackwardError
from traincraft.optim import LRSuggestion, lr_from_curvature, suggest_learning_rate

DIM, SAMPLES, BATCH = 5, 16, 8


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    # anisotropic inputs: a Hessian XᵀX/N with well separated eigenvalues
    x = torch.randn(SAMPLES, DIM, generator=generator) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25])
    y = torch.randn(SAMPLES, generator=generator)
    return x, y


def _loader(seed=0):
    return DataLoader(TensorDataset(*_data(seed)), batch_size=BATCH, shuffle=False)


class LeastSquares(pl.LightningModule):
    """Loss ½·mean((xᵀw - y)²): the Hessian is XᵀX/N whatever the weights."""

    def __init__(self, make_optimizer):
        super().__init__()
        self.net = nn.Linear(DIM, 1, bias=False)
        self.make_optimizer = make_optimizer

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def compute_loss(self, prediction, targets):
        return 0.5 * ((prediction - targets) ** 2).mean()

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def _hessian():
    x, _ = _data()
    return x.T @ x / SAMPLES


def _lambda_max():
    return torch.linalg.eigvalsh(_hessian().double())[-1].item()


@pytest.mark.parametrize("momentum,nesterov,threshold", [(0.0, False, 2.0), (0.9, False, 3.8),
                                                         (0.9, True, 3.8 / 2.8)])
def test_sgd_suggestion_matches_the_closed_form_on_a_quadratic(momentum, nesterov, threshold):
    module = LeastSquares(lambda p: torch.optim.SGD(p, lr=0.01, momentum=momentum, nesterov=nesterov))
    found = suggest_learning_rate(module, train_dataloaders=_loader(), batches=2, warmup_steps=0, iterations=DIM)
    lam = _lambda_max()
    assert found.lambda_max == pytest.approx(lam, rel=1e-4)
    assert found.threshold == pytest.approx(threshold)
    assert found.threshold_lr == pytest.approx(threshold / lam, rel=1e-4)
    assert found.lr == pytest.approx(0.5 * threshold / lam, rel=1e-4)
    if momentum == 0:
        assert found.lr == pytest.approx(1 / lam, rel=1e-4)  # gradient descent: the best rate 1/λ_max
    assert found.batches == 2 and found.warmup_steps == 0 and found.seconds > 0
    assert "suggested lr" in str(found) and "SGD" in found.optimizer


def test_suggestion_is_stable_and_the_threshold_is_the_edge():
    """Gradient descent on the quadratic at the suggested rate converges, just above the threshold rate diverges."""
    module = LeastSquares(lambda p: torch.optim.SGD(p, lr=0.01))
    found = suggest_learning_rate(module, train_dataloaders=_loader(), batches=2, warmup_steps=0, iterations=DIM)
    x, y = _data()
    solution = torch.linalg.lstsq(x.double(), y.double()).solution
    start = torch.linalg.vector_norm(solution).item()
    for lr, converges in ((found.lr, True), (found.threshold_lr * 1.05, False)):
        w = torch.zeros(DIM, dtype=torch.float64)
        for _ in range(300):
            w = w - lr * (x.double().T @ (x.double() @ w - y.double()) / SAMPLES)
        error = torch.linalg.vector_norm(w - solution).item()
        assert (error < 0.5 * start) if converges else (error > 1e3 * start)


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_suggestion_matches_a_dense_preconditioned_hessian(kind):
    def make(p):
        return kind(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    module = LeastSquares(make)
    twin = copy.deepcopy(module)
    found = suggest_learning_rate(module, train_dataloaders=_loader(), batches=2, warmup_steps=3, iterations=DIM)
    # the reference: the same three warm-up steps (batches 0, 1, 0 of the unshuffled loader), then P = √v̂ + ε
    optimizer = twin.configure_optimizers()
    batches = list(_loader())
    for batch in (batches[0], batches[1], batches[0]):
        optimizer.zero_grad()
        twin.compute_loss(twin(batch[0]), batch[1]).backward()
        optimizer.step()
    state = optimizer.state[twin.net.weight]
    v_hat = state["exp_avg_sq"].reshape(-1).double() / (1 - 0.999 ** float(state["step"]))
    root = (1.0 / (v_hat.sqrt() + 1e-8)).sqrt()
    lam = torch.linalg.eigvalsh(root[:, None] * _hessian().double() * root[None, :])[-1].item()  # λ_max(P⁻¹H)
    assert found.lambda_max == pytest.approx(lam, rel=1e-4)
    assert found.threshold == pytest.approx(38.0)
    assert found.threshold_lr == pytest.approx(38.0 / lam, rel=1e-4)
    assert found.lr == pytest.approx(19.0 / lam, rel=1e-4)
    assert found.optimizer == f"{kind.__name__}(beta1=0.9)"


def test_lr_from_curvature_closed_forms():
    assert lr_from_curvature(50.0) == pytest.approx(1 / 50)
    assert lr_from_curvature(50.0, "sgd", momentum=0.5, fraction=1.0) == pytest.approx(3.0 / 50)
    assert lr_from_curvature(50.0, "sgd", momentum=0.5, nesterov=True, fraction=1.0) == pytest.approx(1.5 / 50)
    assert lr_from_curvature(50.0, "adamw", beta1=0.8, fraction=1.0) == pytest.approx(18.0 / 50)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    assert lr_from_curvature(10.0, optimizer, fraction=0.25) == pytest.approx(0.25 * 3.8 / 10)


class _Noisy(LeastSquares):
    def __init__(self, make_optimizer):
        super().__init__(make_optimizer)
        self.net = nn.Sequential(nn.Linear(DIM, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1))


def test_the_module_is_left_exactly_as_it_was():
    torch.manual_seed(3)
    module = _Noisy(lambda p: torch.optim.Adam(p, lr=0.05))
    module.eval()
    module.net[1].train()  # a mixed mode must come back mixed
    module.net[0].weight.grad = torch.full_like(module.net[0].weight, 0.5)
    before = copy.deepcopy(module.state_dict())
    modes = [m.training for m in module.modules()]
    rng, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    found = suggest_learning_rate(module, train_dataloaders=DataLoader(TensorDataset(*_data()), batch_size=BATCH,
                                                                       shuffle=True), batches=2, warmup_steps=4)
    assert isinstance(found, LRSuggestion) and found.lr > 0
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(module.net[0].weight.grad, torch.full_like(module.net[0].weight, 0.5))
    assert module.net[4].weight.grad is None
    assert [m.training for m in module.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy[1])


def test_the_suggestion_repeats_with_its_seed():
    def run():
        module = _Noisy(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        module.load_state_dict(reference)
        loader = DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=True)
        return suggest_learning_rate(module, train_dataloaders=loader, batches=2, warmup_steps=2, seed=7).lr

    torch.manual_seed(0)
    reference = _Noisy(lambda p: None).state_dict()
    torch.manual_seed(1)
    first = run()
    torch.manual_seed(2)  # another global state: the same suggestion
    assert run() == first


class _TwoOptimizers(LeastSquares):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]


class _NoLoss(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(DIM, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Fused(nn.Module):
    def forward(self, x):
        return _OnceDifferentiableTanh.apply(x)


class _NoDoubleBackward(LeastSquares):
    def __init__(self, make_optimizer):
        super().__init__(make_optimizer)
        self.net = nn.Sequential(nn.Linear(DIM, 4), _Fused(), nn.Linear(4, 1))


def test_refusals_say_what_to_do():
    loader = _loader()
    with pytest.raises(TypeError, match="configures 2 optimizers"):
        suggest_learning_rate(_TwoOptimizers(None), train_dataloaders=loader)
    with pytest.raises(TypeError, match="Adadelta has no known stability threshold.*lr_find"):
        suggest_learning_rate(LeastSquares(torch.optim.Adadelta), train_dataloaders=loader)
    with pytest.raises(TypeError, match="neither probe_loss.*nor compute_loss"):
        suggest_learning_rate(_NoLoss(), train_dataloaders=loader)
    sgd = LeastSquares(lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="exactly one source.*neither"):
        suggest_learning_rate(sgd)
    with pytest.raises(ValueError, match="batches must be an integer >= 1; got 0"):
        suggest_learning_rate(sgd, train_dataloaders=loader, batches=0)
    with pytest.raises(ValueError, match="fraction must be a number in \\(0, 1\\]"):
        suggest_learning_rate(sgd, train_dataloaders=loader, fraction=1.5)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        suggest_learning_rate(LeastSquares(torch.optim.Adam), train_dataloaders=loader, warmup_steps=0)
    with pytest.raises(ValueError, match="no batch"):
        suggest_learning_rate(sgd, train_dataloaders=[], warmup_steps=1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lambda_max must be a finite number > 0"):
            lr_from_curvature(bad)
    with pytest.raises(ValueError, match="one of \\['sgd', 'adam', 'adamw'\\]; got 'lion'"):
        lr_from_curvature(1.0, "lion")
    with pytest.raises(ValueError, match="nesterov=True needs"):
        lr_from_curvature(1.0, "sgd", nesterov=True)


def test_a_model_without_double_backward_is_named_and_left_untouched():
    module = _NoDoubleBackward(lambda p: torch.optim.SGD(p, lr=0.1))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(DoubleBackwardError, match=r"the module 'net\.1' \(_Fused\) does not support double backward"):
        suggest_learning_rate(module, train_dataloaders=_loader(), warmup_steps=2)
    for key, value in module.state_dict().items():  # the warm-up steps were undone on the way out
        assert torch.equal(value, before[key]), key

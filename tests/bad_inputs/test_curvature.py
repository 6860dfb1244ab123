"""Bad inputs to the curvature probe: each message names what was received and what to do."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers import tiny_trainer
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.metrics.hessian import (
    DoubleBackwardError,
    extreme_eigenpairs,
    hessian_vector_operator,
    hutchinson_trace,
    lanczos,
    power_iteration,
)

CONSTRUCTOR = {
    "every_n_steps zero": ({"every_n_steps": 0}, r"every_n_steps must be an integer >= 1; got 0\. Pass e\.g\. 1200"),
    "every_n_steps float": ({"every_n_steps": 2.5}, r"every_n_steps must be an integer >= 1; got 2\.5\. Pass"),
    "every_n_steps bool": ({"every_n_steps": True}, r"every_n_steps must be an integer >= 1; got True\. Pass"),
    "every_n_steps string": ({"every_n_steps": "50"}, r"every_n_steps must be an integer >= 1; got '50'\. Pass"),
    "iterations zero": ({"iterations": 0}, r"iterations must be an integer >= 1; got 0\. Pass e\.g\. 12"),
    "iterations negative": ({"iterations": -3}, r"iterations must be an integer >= 1; got -3\. Pass"),
    "first_iterations zero": ({"first_iterations": 0}, r"first_iterations must be an integer >= 1; got 0\. Pass"),
    "first_iterations None": ({"first_iterations": None}, r"first_iterations must be an integer >= 1; got None"),
    "hutchinson negative": ({"hutchinson_samples": -1}, r"hutchinson_samples must be an integer >= 0; got -1\. Pass"),
    "optimizer_index negative": ({"optimizer_index": -1}, r"optimizer_index must be an integer >= 0; got -1\. Pass"),
    "probe_batch_size zero": ({"probe_batch_size": 0}, r"probe_batch_size must be None \(the whole first batch\) or "
                                                       r"an integer >= 1; got 0\. Pass e\.g\. 32"),
    "probe_batch_size float": ({"probe_batch_size": 1.5}, r"probe_batch_size must be None .* got 1\.5"),
    "saddle_ratio negative": ({"saddle_ratio": -0.1}, r"saddle_ratio must be a number >= 0; got -0\.1\. Pass e\.g\. 0\.1"),
    "saddle_ratio string": ({"saddle_ratio": "high"}, r"saddle_ratio must be a number >= 0; got 'high'"),
    "saddle_ratio nan": ({"saddle_ratio": float("nan")}, r"saddle_ratio must be a number >= 0; got nan"),
    "directional string": ({"directional": "yes"}, r"directional must be True or False; got 'yes'\. Pass a bool"),
}


@pytest.mark.parametrize("kwargs,message", list(CONSTRUCTOR.values()), ids=list(CONSTRUCTOR))
def test_bad_configuration_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurvatureMonitor(**kwargs)


def _quadratic():
    return lambda v: torch.tensor([3.0, -1.0, 0.5]) * v


FUNCTIONS = {
    "lanczos iterations zero": (lambda: lanczos(_quadratic(), torch.ones(3), 0),
                                r"iterations must be an integer >= 1 \(operator products\); got 0\. Pass e\.g\. 20"),
    "lanczos iterations float": (lambda: lanczos(_quadratic(), torch.ones(3), 2.0),
                                 r"iterations must be an integer >= 1 .* got 2\.0"),
    "lanczos no starts": (lambda: lanczos(_quadratic(), [], 5),
                          r"starts is empty: pass at least one start vector"),
    "lanczos starts of two sizes": (lambda: lanczos(_quadratic(), [torch.ones(3), torch.ones(4)], 5),
                                    r"of one size; got shapes \[\(3,\), \(4,\)\]\. Flatten them"),
    "lanczos start not flat": (lambda: lanczos(_quadratic(), torch.ones(3, 1), 5),
                               r"must be flat and of one size; got shapes \[\(3, 1\)\]"),
    "lanczos also with one iteration": (lambda: lanczos(_quadratic(), torch.ones(3), 1, also=torch.ones(3)),
                                        r"also needs iterations >= 2.* got 1 iterations.*Raise iterations"),
    "lanczos also of another size": (lambda: lanczos(_quadratic(), torch.ones(3), 3, also=torch.ones(5)),
                                     r"also needs .* shape \(5,\)\. Raise iterations, pass a flat vector"),
    "eigenpairs of a vector": (lambda: extreme_eigenpairs(torch.ones(4)),
                               r"expected a square symmetric matrix; got shape \(4,\)\. Pass the \(k, k\) matrix"),
    "eigenpairs of a rectangle": (lambda: extreme_eigenpairs(torch.ones(2, 3)),
                                  r"expected a square symmetric matrix; got shape \(2, 3\)"),
    "power iteration zero": (lambda: power_iteration(_quadratic(), torch.ones(3), 0),
                             r"iterations must be an integer >= 1 \(operator products\); got 0"),
    "hutchinson zero samples": (lambda: hutchinson_trace(_quadratic(), 3, 0),
                                r"samples must be an integer >= 1; got 0\. Pass e\.g\. 10"),
    "loss not a scalar": (lambda: hessian_vector_operator(nn.Parameter(torch.ones(3)) * 2, []),
                          r"the loss must be a scalar; got shape \(3,\)\. Reduce it \(mean\) first"),
}


@pytest.mark.parametrize("call,message", list(FUNCTIONS.values()), ids=list(FUNCTIONS))
def test_bad_arguments_to_the_maths_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class _Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_a_once_differentiable_loss_is_refused_by_the_operator():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(DoubleBackwardError, match=r"does not support double backward.*Replace operations marked "
                                                  r"@once_differentiable"):
        hvp, _ = hessian_vector_operator((_Once.apply(w) * w).sum(), [w])
        hvp(torch.ones(3))


def test_weights_changed_in_place_after_the_operator_was_built():
    w = nn.Parameter(torch.randn(3))
    hvp, _ = hessian_vector_operator((w**3).sum(), [w])
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"changed in place after this Hessian-vector operator was built.*build a "
                                           r"new operator at the current weights"):
        hvp(torch.ones(3))


def test_probe_before_any_batch():
    with pytest.raises(RuntimeError, match=r"no probe batch yet: .* call it from a training hook"):
        CurvatureMonitor().probe(BoringModel(), None)


class _TwoOptimizers(LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        for optimizer, layer in zip(self.optimizers(), (self.a, self.b), strict=True):
            optimizer.zero_grad()
            self.manual_backward(layer(batch).pow(2).mean())
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]

    def train_dataloader(self):
        return DataLoader(torch.randn(8, 2), batch_size=4)


class _DictBatches(LightningModule):
    """Has compute_loss (the classifier's hook) but yields dict batches: the probe cannot split (x, y)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        return self.layer(x)

    def compute_loss(self, logits, targets):
        return (logits.squeeze(1) - targets).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.compute_loss(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader([{"x": torch.randn(2), "y": torch.randn(())} for _ in range(8)], batch_size=4)


FITS = {
    "no loss": (BoringModel, {}, TypeError, r"BoringModel has neither probe_loss\(batch\) nor compute_loss.*Add "
                                            r"`def probe_loss\(self, batch\)"),
    "two optimizers, no probe_loss": (_TwoOptimizers, {}, TypeError,
                                      r"_TwoOptimizers has 2 optimizers.*Add `def probe_loss\(self, batch\).*"
                                      r"optimizer_index"),
    "optimizer_index out of range": (_TwoOptimizers, {"optimizer_index": 5}, ValueError,
                                     r"CurvatureMonitor\(optimizer_index=5\) but _TwoOptimizers has 2 optimizer\(s\); "
                                     r"use an index below 2"),
    "optimizer_index with one optimizer": (BoringModel, {"optimizer_index": 1}, ValueError,
                                           r"optimizer_index=1\) but BoringModel has 1 optimizer\(s\)"),
    "dict batches without probe_loss": (_DictBatches, {}, TypeError,
                                        r"the probe batch is a dict, not \(inputs, targets\); define "
                                        r"probe_loss\(batch\) on _DictBatches"),
}


@pytest.mark.parametrize("module,kwargs,error,message", list(FITS.values()), ids=list(FITS))
def test_modules_the_probe_cannot_measure_are_refused_before_the_epoch_is_spent(module, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[CurvatureMonitor(**kwargs)]).fit(module())


def test_no_trainable_parameters_to_probe():
    model = BoringModel().requires_grad_(False)
    monitor = CurvatureMonitor()
    monitor._probe_batch = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"BoringModel has no trainable parameters to probe .* Unfreeze some"):
        monitor.probe(model, None)

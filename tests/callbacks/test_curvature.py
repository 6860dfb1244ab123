"""CurvatureMonitor end to end: accuracy against long power iterations, no effect on training, logging, errors."""

import csv
import functools

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.hessian import (
    effective_rate_diagonal,
    hessian_vector_operator,
    params_of,
    power_iteration,
    scaled_operator,
)
from traincraft.modules import ImageClassifier


def _classifier(optimizer, **model_kwargs):
    model_kwargs.setdefault("hidden", [32])
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs=model_kwargs,
                           optimizer=optimizer)


def _fit(callbacks, optimizer, max_steps=7, seed=0, logger=False, log_every_n_steps=50, **model_kwargs):
    seed_everything(seed)
    clf = _classifier(optimizer, **model_kwargs)
    trainer = tiny_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks, logger=logger,
                           log_every_n_steps=log_every_n_steps)
    trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=64))  # kornia augmentation on
    return clf, trainer


def _reference_lambda(clf, batch, diagonal_of=None, iterations=150):
    """Long cold-started power iteration on the probe batch at the final weights (training-mode function)."""
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    clf.train()
    loss = clf.compute_loss(clf(batch[0]), batch[1])
    hvp, grad = hessian_vector_operator(loss, params_of(clf))
    operator = hvp if diagonal_of is None else scaled_operator(hvp, diagonal_of)
    value, _ = power_iteration(operator, torch.randn(grad.numel(), generator=torch.Generator().manual_seed(1)),
                               iterations)
    clf.load_state_dict(state)
    return value.item()


def test_warm_started_lambda_max_and_eta_lambda_match_a_long_power_iteration_with_sgd_momentum():
    monitor = CurvatureMonitor(every_n_steps=3, iterations=30, first_iterations=30)
    clf, trainer = _fit([monitor], functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    assert monitor.probes == 3  # steps 1, 4, 7
    reference = _reference_lambda(clf, monitor._probe_batch)
    assert monitor.last["lambda_max"].item() == pytest.approx(reference, rel=0.01)
    assert monitor.last["eta_opt"].item() == pytest.approx(1 / reference, rel=0.01)
    assert monitor.last["eta_lambda"].item() == pytest.approx(0.05 * monitor.last["lambda_max"].item(), rel=1e-6)
    assert monitor.last["threshold"].item() == pytest.approx(3.8)
    assert 0 < monitor.last["directional"].item() <= monitor.last["lambda_max"].item() * 1.0001


def test_adam_gets_the_preconditioned_sharpness_against_38():
    monitor = CurvatureMonitor(every_n_steps=3, iterations=30, first_iterations=30)
    clf, trainer = _fit([monitor], functools.partial(torch.optim.Adam, lr=1e-3))
    optimizer = trainer.optimizers[0]
    reference = _reference_lambda(clf, monitor._probe_batch, effective_rate_diagonal(optimizer, params_of(clf)))
    assert monitor.last["eta_lambda"].item() == pytest.approx(reference, rel=0.01)
    assert monitor.last["threshold"].item() == pytest.approx(38.0)
    assert monitor.last["stability_ratio"].item() == pytest.approx(reference / 38.0, rel=0.01)


def test_the_probe_does_not_disturb_training():
    """BatchNorm statistics, dropout masks, augmentation draws, gradients: the run is bit-identical without it."""
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)

    class GradsAtProbe(Callback):  # .grad right before and after the monitor's end-of-batch hook
        def __init__(self):
            self.before, self.after = [], []

        def on_train_batch_end(self, trainer, pl_module, *args):
            store = self.before if not self.before or len(self.before) == len(self.after) else self.after
            store.append([None if p.grad is None else p.grad.clone() for p in pl_module.parameters()])

    grads = GradsAtProbe()
    with_probe, _ = _fit([grads, CurvatureMonitor(every_n_steps=2, hutchinson_samples=2), grads], sgd,
                         dropout=0.3, max_steps=6)
    without, _ = _fit([], sgd, dropout=0.3, max_steps=6)
    for (key, a), b in zip(with_probe.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # weights and BatchNorm running statistics
    for before, after in zip(grads.before, grads.after, strict=False):
        for a, b in zip(before, after, strict=False):
            assert (a is None and b is None) or torch.equal(a, b)


def test_logged_at_logging_steps_only_and_without_host_sync_elsewhere():
    window = SyncWindow()
    counts, current, enabled = window.counts, window.current, window.enabled

    monitor = CurvatureMonitor(every_n_steps=3, hutchinson_samples=1)
    # the monitor's end-of-batch hook runs before SyncWindow closes the counting window: probes are counted too
    logger = CSVLogger(".", name="curv")
    seed_everything(0)
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, limit_val_batches=0, logger=logger,
                           callbacks=[monitor, window])
    with count_host_syncs(current, enabled):
        trainer.fit(_classifier(functools.partial(torch.optim.Adam, lr=1e-3)), datamodule=DigitsDataModule(image_size=8))
    assert len(counts) == 8
    quiet = {step: c for step, c in counts.items() if step % 4 != 0}  # includes probe steps 1 and 7
    assert quiet and all(not c for c in quiet.values()), quiet
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("curvature/lambda_max")]
    # probes after steps 1, 4, 7; logged at the logging steps 4 (probes 1 and 4: the latest) and 8 (probe 7)
    assert [int(r["step"]) for r in rows] == [3, 7]
    assert all(float(r["curvature/trace"]) != 0 and float(r["curvature/threshold"]) == 38.0 for r in rows)


class _OnceDifferentiableReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.b(_OnceDifferentiableReLU.apply(self.a(x.flatten(1))))


def test_a_model_without_double_backward_gets_a_clear_error():
    clf = ImageClassifier(_FusedNet(), num_classes=10)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[CurvatureMonitor(every_n_steps=1)])
    with pytest.raises(RuntimeError, match="does not support double backward.*once_differentiable"):
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, augment="none"))


def test_bad_configuration_and_modules_without_a_loss_are_rejected():
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1; got 0"):
        CurvatureMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="probe_batch_size"):
        CurvatureMonitor(probe_batch_size=0)
    trainer = tiny_trainer(max_steps=1, callbacks=[CurvatureMonitor()])
    with pytest.raises(TypeError, match="probe_loss"):
        trainer.fit(BoringModel())


def test_the_eigenvector_is_checkpointed_and_warm_starts_after_resume(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=2)
    _, trainer = _fit([monitor], functools.partial(torch.optim.SGD, lr=0.05), max_steps=3)
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][monitor.state_key]
    assert torch.equal(state["eigenvector"], monitor.eigenvector) and state["probes"] == 2
    fresh = CurvatureMonitor(every_n_steps=2, first_iterations=1000)  # a cold start would take 1000 iterations
    fresh.load_state_dict(state)
    assert fresh.eigenvector is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_probe_runs_in_fp32_under_mixed_precision():
    def run(precision):
        seed_everything(0)
        monitor = CurvatureMonitor(every_n_steps=3, first_iterations=60)
        clf = _classifier(functools.partial(torch.optim.SGD, lr=0.05))
        trainer = tiny_trainer(accelerator="gpu", precision=precision, max_steps=1, limit_val_batches=0,
                               callbacks=[monitor], deterministic=False)
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, augment="none"))
        return monitor.last["lambda_max"].item()

    assert run("16-mixed") == pytest.approx(run("32-true"), rel=0.02)

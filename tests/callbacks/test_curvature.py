"""CurvatureMonitor end to end: accuracy against long power iterations, no effect on training, logging, errors."""

import csv
import functools

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.hessian import DoubleBackwardError, effective_rate_diagonal, params_of
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


def _dense_hessian(loss, params):
    """The exact Hessian and gradient; one vmapped backward over all unit vectors (a slow reference: small models)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = torch.autograd.grad(flat, params, grad_outputs=torch.eye(flat.numel()), is_grads_batched=True)
    return torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1).double(), flat.detach().double()


class DenseAtProbe(Callback):
    """After each probe (placed after the monitor), the dense spectrum at the same weights, on the probe batch."""

    def __init__(self, monitor, loss_of=None, params_of_module=None, diagonal=False):
        self.monitor, self.loss_of, self.params_of_module, self.diagonal = monitor, loss_of, params_of_module, diagonal
        self.seen, self.spectra, self.scaled, self.measured = 0, [], [], []
        self.hessians, self.gradients = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.monitor.probes == self.seen:
            return
        self.seen = self.monitor.probes
        self.measured.append({key: value.item() for key, value in self.monitor.last.items()})
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        params = (self.params_of_module or params_of)(pl_module)
        batch = self.monitor._probe_batch
        with torch.autocast("cpu", enabled=False), sdpa_kernel(SDPBackend.MATH):
            loss = (self.loss_of or (lambda m, b: m.compute_loss(m(b[0]), b[1])))(pl_module, batch).float()
            dense, gradient = _dense_hessian(loss, params)
        self.spectra.append(torch.linalg.eigvalsh(dense))
        self.hessians.append(dense)
        self.gradients.append(gradient)
        if self.diagonal:
            root = effective_rate_diagonal(trainer.optimizers[0], params).double().sqrt()
            self.scaled.append(torch.linalg.eigvalsh(root[:, None] * dense * root[None, :]))
        pl_module.load_state_dict(state)  # BatchNorm statistics


def _assert_ends(monitor, spectrum, rel=0.02, measured=None):
    """λ_max within ``rel``; λ_min within ``rel`` of the spectral radius (relative, where |λ_min| is that radius)."""
    measured = measured or {key: value.item() for key, value in monitor.last.items()}
    low, high = spectrum[0].item(), spectrum[-1].item()
    radius = spectrum.abs().max().item()
    assert measured["lambda_max"] == pytest.approx(high, rel=rel)
    assert abs(measured["lambda_min"] - low) < rel * radius


def test_warm_started_lambda_max_and_eta_lambda_match_the_dense_hessian_with_sgd_momentum():
    monitor = CurvatureMonitor(every_n_steps=3)
    dense = DenseAtProbe(monitor)
    clf, trainer = _fit([monitor, dense], functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), hidden=[8])
    assert monitor.probes == 3  # after stepped batches 1, 4, 7
    for spectrum in dense.spectra[-1:]:
        _assert_ends(monitor, spectrum)
    high = dense.spectra[-1][-1].item()
    assert monitor.last["eta_opt"].item() == pytest.approx(1 / high, rel=0.02)
    assert monitor.last["eta_lambda"].item() == pytest.approx(0.05 * monitor.last["lambda_max"].item(), rel=1e-6)
    assert monitor.last["threshold"].item() == pytest.approx(3.8)
    gradient = dense.gradients[-1]
    expected = (gradient @ dense.hessians[-1] @ gradient / (gradient @ gradient)).item()
    assert monitor.last["directional"].item() == pytest.approx(expected, rel=1e-3)
    negative = max(0.0, -monitor.last["lambda_min"].item()) / monitor.last["lambda_max"].item()
    assert monitor.last["negative_ratio"].item() == pytest.approx(negative, rel=1e-5)
    assert monitor.last["saddle"].item() == float(negative > 0.1)


def test_adam_gets_the_preconditioned_sharpness_against_38():
    monitor = CurvatureMonitor(every_n_steps=3)
    dense = DenseAtProbe(monitor, diagonal=True)
    _fit([monitor, dense], functools.partial(torch.optim.Adam, lr=1e-3), hidden=[8])
    reference = dense.scaled[-1][-1].item()  # largest algebraic eigenvalue of D^½HD^½
    assert monitor.last["eta_lambda"].item() == pytest.approx(reference, rel=0.02)
    assert monitor.last["threshold"].item() == pytest.approx(38.0)
    assert monitor.last["stability_ratio"].item() == pytest.approx(reference / 38.0, rel=0.02)
    _assert_ends(monitor, dense.spectra[-1])


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


class _PlainClassifier(LightningModule):
    """An MLP with BatchNorm and Adam, without ImageClassifier's own first-step checks (they sync once by design)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x.float())

    def compute_loss(self, logits, targets):
        return nn.functional.cross_entropy(logits, targets)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


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
        trainer.fit(_PlainClassifier(), datamodule=DigitsDataModule(image_size=8))
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


class _FusedReLU(nn.Module):
    def forward(self, x):
        return _OnceDifferentiableReLU.apply(x)


class _FusedNet(nn.Module):
    def __init__(self, inline=False):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(64, 16), _FusedReLU(), nn.Linear(16, 10)
        self.inline = inline

    def forward(self, x):
        hidden = self.a(x.flatten(1))
        return self.b(_OnceDifferentiableReLU.apply(hidden) if self.inline else self.act(hidden))


@pytest.mark.parametrize("inline,where", [(False, r"the module 'model\.act' \(_FusedReLU\)"),
                                          (True, r"the module 'model' \(_FusedNet\)")])
def test_a_model_without_double_backward_gets_a_clear_error_naming_the_module(inline, where):
    clf = ImageClassifier(_FusedNet(inline), num_classes=10)
    seen = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.global_step)

    trainer = tiny_trainer(max_steps=20, limit_val_batches=0, callbacks=[Batches(), CurvatureMonitor(every_n_steps=5)])
    with pytest.raises(DoubleBackwardError, match=where + " does not support double backward.*once_differentiable"):
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, augment="none"))
    assert seen == [0]  # the first stepped batch is probed: the error comes before the epoch is spent


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
    _, trainer = _fit([monitor], functools.partial(torch.optim.SGD, lr=0.05), max_steps=3, hidden=[8])
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][monitor.state_key]
    assert torch.equal(state["eigenvector"], monitor.eigenvector) and state["probes"] == 2
    assert torch.equal(state["eigenvector_min"], monitor.eigenvector_min)
    fresh = CurvatureMonitor(every_n_steps=2, first_iterations=2)  # a cold start would be far off with 2 products
    dense = DenseAtProbe(fresh)
    seed_everything(0)
    resumed = tiny_trainer(max_steps=4, max_epochs=-1, limit_val_batches=0, callbacks=[fresh, dense], logger=False)
    clf = _classifier(functools.partial(torch.optim.SGD, lr=0.05), hidden=[8])
    resumed.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=64), ckpt_path=path)
    # the resumed fit's first stepped batch (the 4th, off the every-2 grid) is probed, warm from the checkpoint
    assert fresh.probes == 3
    _assert_ends(fresh, dense.spectra[-1])


class _Players(LightningModule):
    """Two players, two optimizers, manual optimization: global_step moves by 2 per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.register_buffer("noise", torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))

    def _d_loss(self, real, fake):
        logits = self.discriminator(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(len(real), 4))
        d_opt.zero_grad()
        self.manual_backward(self._d_loss(real, fake.detach()))
        d_opt.step()
        g_opt.zero_grad()
        logits = self.discriminator(self.generator(torch.randn(len(real), 4)))
        self.manual_backward(nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)))
        g_opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.SGD(self.discriminator.parameters(), lr=0.1, momentum=0.5)]

    def train_dataloader(self):
        data = torch.randn(256, 6, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
        return DataLoader(TensorDataset(data), batch_size=16)


class _GAN(_Players):
    def probe_loss(self, batch):  # the discriminator's loss on a fixed noise batch
        return self._d_loss(batch[0], self.generator(self.noise))


def test_a_gan_with_manual_optimization_is_probed_and_logged_per_batch(tmp_path):
    seed_everything(0)
    monitor = CurvatureMonitor(every_n_steps=2, optimizer_index=1)
    dense = DenseAtProbe(monitor, loss_of=lambda m, b: m.probe_loss(b),
                         params_of_module=lambda m: list(m.discriminator.parameters()))
    logger = CSVLogger(str(tmp_path), name="gan")
    trainer = tiny_trainer(max_steps=12, log_every_n_steps=2, logger=logger, callbacks=[monitor, dense])
    trainer.fit(_GAN())
    assert trainer.global_step == 12 and monitor.probes == 3  # 6 batches; probes after batches 1, 3, 5
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("curvature/lambda_max")]
    assert len(rows) == 3  # logging batches 2, 4, 6, each after a fresh probe
    _assert_ends(monitor, dense.spectra[-1])
    assert dense.spectra[-1].numel() == 65  # the discriminator's parameters only
    assert monitor.last["threshold"].item() == pytest.approx(3.0)  # SGD momentum 0.5: the discriminator's
    assert monitor.last["eta_lambda"].item() == pytest.approx(0.1 * monitor.last["lambda_max"].item(), rel=1e-6)


def test_several_optimizers_without_probe_loss_are_refused_at_fit_start():
    gan = _Players()
    gan.compute_loss = lambda logits, targets: logits.sum()  # a single-loss hook is not enough with two players
    with pytest.raises(TypeError, match="2 optimizers.*def probe_loss"):
        tiny_trainer(max_steps=2, callbacks=[CurvatureMonitor()]).fit(gan)
    with pytest.raises(ValueError, match=r"optimizer_index=2\) but _GAN has 2 optimizer\(s\)"):
        tiny_trainer(max_steps=2, callbacks=[CurvatureMonitor(optimizer_index=2)]).fit(_GAN())


class _TinyLM(LightningTransformer):
    """Lightning's demo transformer LM, small, on random tokens (no download)."""

    def __init__(self):
        super().__init__(vocab_size=8)
        self.model = Transformer(vocab_size=8, ninp=4, nhead=2, nhid=4, nlayers=1, dropout=0.0)

    def probe_loss(self, batch):
        inputs, target = batch
        return nn.functional.nll_loss(self(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.005)  # stays near the initialization, a saddle-like point

    def prepare_data(self):
        pass

    def train_dataloader(self):
        tokens = torch.randint(0, 8, (64, 2, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader([(t[0], t[1]) for t in tokens], batch_size=4)


def test_transformer_lm_probe_gives_a_positive_sharpness_matching_the_dense_hessian():
    seed_everything(0)
    monitor = CurvatureMonitor(every_n_steps=4)
    dense = DenseAtProbe(monitor, loss_of=lambda m, b: m.probe_loss(b))
    tiny_trainer(max_steps=5, callbacks=[monitor, dense]).fit(_TinyLM())
    assert monitor.probes == 2
    first = dense.spectra[0]
    assert -first[0] > 2 * first[-1] > 0  # the largest magnitude is negative: power iteration would say < 0
    for spectrum, measured in zip(dense.spectra, dense.measured, strict=True):
        assert measured["lambda_max"] > 0
        _assert_ends(monitor, spectrum, measured=measured)
        assert measured["eta_opt"] == pytest.approx(1 / spectrum[-1].item(), rel=0.02)
    assert dense.measured[0]["saddle"] == 1.0 and dense.measured[0]["negative_ratio"] > 2


def test_bf16_mixed_probes_in_fp32_and_accumulation_counts_stepped_batches():
    def run(**trainer_kwargs):
        seed_everything(0)
        monitor = CurvatureMonitor(every_n_steps=2)
        dense = DenseAtProbe(monitor)
        seen = []

        class Probes(Callback):  # the batch index of each probe
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if monitor.probes > len(seen):
                    seen.append(batch_idx)

        trainer = tiny_trainer(max_steps=3, limit_val_batches=0, callbacks=[monitor, dense, Probes()], **trainer_kwargs)
        trainer.fit(_classifier(functools.partial(torch.optim.SGD, lr=0.05), hidden=[8]),
                    datamodule=DigitsDataModule(image_size=8, batch_size=32))
        return monitor, dense, seen

    monitor, dense, seen = run(precision="bf16-mixed")
    assert seen == [0, 2]  # after stepped batches 1 and 3
    _assert_ends(monitor, dense.spectra[-1], rel=0.02)  # the dense reference runs in fp32 outside autocast
    monitor, dense, seen = run(accumulate_grad_batches=2)
    assert seen == [1, 5]  # micro-batches 0-1 are stepped batch 1, 4-5 are stepped batch 3
    _assert_ends(monitor, dense.spectra[-1])


def test_sharded_parameters_are_refused_at_setup():
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        module = BoringModel()
        module.layer.weight = nn.Parameter(distribute_tensor(module.layer.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(ValueError, match=r"CurvatureMonitor cannot compute Hessian-vector products on sharded "
                                             r"parameters \(DTensor: layer.weight\)"):
            CurvatureMonitor().setup(None, module, "fit")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu_the_probe_runs_in_fp32_under_bf16_mixed_and_never_syncs_with_the_host():
    def run(precision):
        seed_everything(0)
        monitor = CurvatureMonitor(every_n_steps=3, first_iterations=40)
        clf = _classifier(functools.partial(torch.optim.SGD, lr=0.05))
        trainer = tiny_trainer(accelerator="gpu", precision=precision, max_steps=1, limit_val_batches=0,
                               callbacks=[monitor], deterministic=False)
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, augment="none"))
        return monitor, clf, trainer

    monitor, clf, trainer = run("bf16-mixed")
    reference, _, _ = run("32-true")
    assert monitor.last["lambda_max"].item() == pytest.approx(reference.last["lambda_max"].item(), rel=0.02)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside a (warm) probe raises
    try:
        monitor.probe(clf, trainer.optimizers[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")

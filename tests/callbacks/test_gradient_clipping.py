"""GradientClipping through a real Trainer: every mode against a plain-torch reference, the non-finite guard leaves
weights and optimizer state bit-identical, no host sync outside logging steps, logging, checkpoints, refusals."""

import copy
import csv
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks.gradient_clipping import GradientClipping
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


def _model(optimizer=None, **kwargs):
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, optimizer=optimizer,
                           model_kwargs={"hidden": [32, 16], **kwargs})


def _fit(callbacks, model=None, steps=6, log_every=50, logger=False, **kwargs):
    model = model or _model()
    trainer = tiny_trainer(max_steps=steps, log_every_n_steps=log_every, limit_val_batches=0, logger=logger,
                           callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    return trainer, model


class Grads(Callback):
    """Records parameters and gradients where it sits in the callback list (before or after the clipper)."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # None where a skipped step's gradients were dropped (skip_method="sync")
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.parameters()])
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def _global(grads, p=2.0):
    return torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads]), p)


def _torch_clip(grads, max_norm, p=2.0):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, g in zip(params, grads, strict=True):
        param.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=p)
    return [param.grad for param in params]


def _scale(grads, threshold):
    coef = min(1.0, threshold / (float(_global(grads)) + 1e-6))
    return [g * coef for g in grads]


def _zclip_reference(norms, z, decay, warmup):
    """ZClip as published: warm-up moments from the first norms, then EMA of the clipped norm."""
    thresholds, warm = [], []
    mean = var = 0.0
    for step, n in enumerate(norms):
        if step < warmup:
            warm.append(n)
            mean, var = float(np.mean(warm)), float(np.var(warm))
            thresholds.append(math.inf)
            continue
        thr = mean + z * math.sqrt(var)
        thresholds.append(thr)
        x = min(n, thr)
        mean = decay * mean + (1 - decay) * x
        var = decay * var + (1 - decay) * (x - mean) ** 2
    return thresholds


def _agc_reference(params, grads, clipping, eps, excluded):
    out = []
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        g = g.clone()
        if i not in excluded:
            rows_w, rows_g = (w.reshape(w.shape[0], -1), g.view(g.shape[0], -1)) if w.ndim > 1 else (
                w.reshape(1, -1), g.view(1, -1))
            for r in range(rows_w.shape[0]):
                max_norm = max(float(rows_w[r].norm()), eps) * clipping
                if float(rows_g[r].norm()) > max_norm:
                    rows_g[r] *= max_norm / max(float(rows_g[r].norm()), 1e-6)
        out.append(g)
    return out


@pytest.mark.parametrize("mode", ["norm", "norm_inf", "norm_layer", "value", "agc", "quantile", "zscore"])
def test_each_mode_equals_a_plain_torch_reference(mode):
    kwargs = {
        "norm": dict(mode="norm", threshold=0.3),
        "norm_inf": dict(mode="norm", threshold=0.02, norm_type=math.inf),
        "norm_layer": dict(mode="norm", threshold=0.1, per_layer=True),
        "value": dict(mode="value", threshold=0.005),
        "agc": dict(mode="agc", agc_clipping=0.02),
        "quantile": dict(mode="quantile", quantile=0.3, history_size=4),
        "zscore": dict(mode="zscore", z_threshold=0.05, ema_decay=0.3, warmup_steps=2),
    }[mode]
    raw, post = Grads(), Grads()
    _fit([raw, GradientClipping(**kwargs), post], steps=9)
    norms = [float(_global(g)) for g in raw.grads]
    thresholds = {
        "quantile": [float(np.percentile(norms[max(0, t - 3): t + 1], 30)) for t in range(len(norms))],
        "zscore": _zclip_reference(norms, 0.05, 0.3, 2),
    }.get(mode)
    clipped_any = False
    for step, (g, w) in enumerate(zip(raw.grads, raw.params, strict=True)):
        if mode in ("norm", "norm_inf"):
            ref = _torch_clip(g, kwargs["threshold"], kwargs.get("norm_type", 2.0))
        elif mode == "norm_layer":
            ref = [_torch_clip([t], 0.1)[0] for t in g]
        elif mode == "value":
            ref = [t.clamp(-0.005, 0.005) for t in g]
        elif mode == "agc":
            ref = _agc_reference(w, g, 0.02, 1e-3, excluded={len(g) - 2, len(g) - 1})  # head.weight, head.bias
        else:
            ref = _scale(g, thresholds[step])
        clipped_any |= any(not torch.equal(a, b) for a, b in zip(ref, g, strict=True))
        for ours, expected in zip(post.grads[step], ref, strict=True):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-9)
    assert clipped_any  # the reference did clip: the comparison is not vacuous


def _poison(steps):
    class Poison(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step in steps:
                next(pl_module.parameters()).grad.view(-1)[0] = math.nan

    return Poison()


class Snapshots(Callback):
    """Weights and optimizer state before and after each step."""

    def __init__(self):
        self.before, self.after = [], []

    def _take(self, trainer, pl_module):
        state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        return [p.detach().clone() for p in pl_module.parameters()], state

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before.append(self._take(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(self._take(trainer, pl_module))


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            assert torch.equal(torch.as_tensor(a[k][name]), torch.as_tensor(b[k][name])), (k, name)


OPTIMIZERS = {
    "sgd_momentum": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "adam_foreach": functools.partial(torch.optim.Adam, lr=1e-2, foreach=True),
    "sgd_momentum_fused": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, fused=True),
    "adamw_fused": functools.partial(torch.optim.AdamW, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("optimizer, method", [
    ("sgd_momentum", "auto"), ("adam", "auto"), ("sgd_momentum", "snapshot"), ("adam_foreach", "snapshot"),
    ("sgd_momentum_fused", "auto"), ("adamw_fused", "auto"),
])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_bit_identical(optimizer, method):
    snaps = Snapshots()
    clip = GradientClipping(mode="norm", threshold=1.0, skip_method=method)
    trainer, _ = _fit([_poison({0, 3}), clip, snaps], model=_model(OPTIMIZERS[optimizer]), steps=6)
    if method == "auto":  # on the CPU, a non-fused optimizer reads the flag: a memory load, no device sync
        assert clip._slots[0].method == ("found_inf" if "fused" in optimizer else "sync")
    for step in (0, 3):  # the first step (state not yet created) and a later one
        before, after = snaps.before[step], snaps.after[step]
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
        _same_state(before[1], after[1])
    assert not snaps.after[0][1]  # the skipped first step created no optimizer state
    for step in (1, 4):  # healthy steps still move the weights
        assert not torch.equal(snaps.before[step][0][0], snaps.after[step][0][0])
    assert int(clip.state_dict()["tensors"]["skipped"]) == 2
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def _quiet_step_syncs(clip, model, steps=8, every=4):
    counts, enabled, current = {}, [False], {}

    class Start(Callback):
        def on_train_batch_start(self, *args):
            current.clear()
            enabled[0] = True

    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            enabled[0] = False
            counts[trainer.global_step] = dict(current)

    with count_host_syncs(current, enabled):
        _fit([Start(), clip, Stop()], model=model, steps=steps, log_every=every, logger=CSVLogger(".", name="s"))
    assert len(counts) == steps
    return counts


@pytest.mark.parametrize("kwargs", [
    dict(), dict(mode="value", threshold=0.01), dict(mode="agc"), dict(mode="quantile", log_layer_norms=True),
    dict(mode="zscore", warmup_steps=2, per_layer=True, skip_spikes=True, log_depth_profile=True),
], ids=["norm", "value", "agc", "quantile", "zscore"])
def test_no_host_sync_on_non_logging_steps(kwargs):
    # the skip method that auto picks for non-fused optimizers on GPUs (on the CPU it picks "sync")
    counts = _quiet_step_syncs(GradientClipping(skip_method="snapshot", **kwargs), _model(torch.optim.AdamW))
    # the snapshot skip method undoes the optimizer's state creation on the first step: one scalar read, documented
    assert counts[1].get("item") == 1  # (ImageClassifier checks the labels of its first batch: __int__)
    quiet = {step: c for step, c in counts.items() if step % 4 != 0 and step != 1}
    assert quiet and all(not c for c in quiet.values()), quiet
    assert counts[4] and counts[8]  # the logging steps do copy (the counter works)


@pytest.mark.parametrize("method", ["found_inf", "sync"])
def test_host_syncs_of_the_other_skip_methods(method):
    counts = _quiet_step_syncs(GradientClipping(skip_method=method),
                               _model(functools.partial(torch.optim.AdamW, fused=True)))
    quiet = {step: c for step, c in counts.items() if step % 4 != 0}
    if method == "found_inf":  # the fused kernel skips on a device flag: only the state-creating first step reads
        assert counts[1].get("item") == 1 and all(not c for s, c in quiet.items() if s != 1), quiet
    else:  # one scalar per step, as documented
        assert counts[1].get("item") == 1 and all(c == {"item": 1} for s, c in quiet.items() if s != 1), quiet


def _metrics(tmp_dir="."):
    (path,) = Path(tmp_dir).rglob("metrics.csv")
    with open(path) as f:
        return [row for row in csv.DictReader(f)]


def test_logged_keys_and_values_match_the_recorded_gradients():
    raw = Grads()
    clip = GradientClipping(mode="norm", threshold=0.3, log_layer_norms=True, log_depth_profile=True)
    _fit([_poison({5}), raw, clip], steps=8, log_every=4, logger=CSVLogger(".", name="log"))
    rows = [r for r in _metrics() if r.get("grad/norm_pre")]
    assert [int(r["step"]) for r in rows] == [3, 7]
    names = [n for n, _ in _model().named_parameters()]
    for row, step in zip(rows, (3, 7), strict=True):
        pre = float(_global(raw.grads[step]))
        assert math.isclose(float(row["grad/norm_pre"]), pre, rel_tol=1e-5)
        assert math.isclose(float(row["grad/norm_post"]), min(pre, 0.3), rel_tol=1e-5)
        assert math.isclose(float(row["grad/clip_coef"]), min(1.0, 0.3 / pre), rel_tol=1e-4)
        assert float(row["grad/threshold"]) == pytest.approx(0.3)
        for name, g in zip(names, raw.grads[step], strict=True):
            assert math.isclose(float(row[f"grad/norm/{name}"]), float(g.norm()), rel_tol=1e-5)
        weights = [g.norm() for n, g in zip(names, raw.grads[step], strict=True) if g.ndim >= 2][::-1]
        slope = np.polyfit(np.arange(len(weights)), np.log([float(w) for w in weights]), 1)[0]
        assert math.isclose(float(row["grad/depth_slope"]), slope, rel_tol=1e-4)
    clipped = [float(_global(g)) > 0.3 for g in raw.grads]
    assert float(rows[0]["grad/clipped_frac"]) == pytest.approx(sum(clipped[:4]) / 4)
    assert float(rows[1]["grad/clipped_frac"]) == pytest.approx((sum(clipped[4:]) - clipped[5]) / 4)  # 5 skipped
    assert [float(r["grad/skipped_steps"]) for r in rows] == [0, 1]


@pytest.mark.parametrize("method", ["snapshot", "sync"])
def test_consecutive_skips_raise_with_an_explanation(method):
    clip = GradientClipping(max_consecutive_skips=3, skip_method=method)
    with pytest.raises(RuntimeError, match=r"skipped \d+ optimizer steps in a row \(limit max_consecutive_skips=3\)"):
        _fit([_poison(set(range(2, 20))), clip], steps=20, log_every=4 if method == "snapshot" else 50)


def test_consecutive_skips_restore_the_last_healthy_snapshot():
    snaps = Snapshots()
    clip = GradientClipping(max_consecutive_skips=2, on_consecutive_skips="restore", skip_method="snapshot")
    _fit([_poison({4, 5, 6, 7}), clip, snaps], steps=10, log_every=4)
    # healthy logging step 3 took the snapshot (weights before its update); step 7 (a logging step) restored it
    healthy = snaps.before[3]
    assert all(torch.equal(a, b) for a, b in zip(healthy[0], snaps.after[7][0], strict=True))
    _same_state(healthy[1], snaps.after[7][1])
    assert not torch.equal(snaps.after[9][0][0], healthy[0][0])  # and training goes on
    with pytest.raises(RuntimeError, match="No healthy snapshot"):  # a second streak with no new snapshot
        _fit([_poison(set(range(4, 20))), GradientClipping(max_consecutive_skips=2, on_consecutive_skips="restore")],
             steps=20, log_every=4)


def test_skip_spikes_skips_instead_of_clipping():
    snaps, raw = Snapshots(), Grads()
    _fit([raw, GradientClipping(threshold=0.3, skip_spikes=True, max_consecutive_skips=None), snaps], steps=6)
    for step, g in enumerate(raw.grads):
        moved = not torch.equal(snaps.before[step][0][0], snaps.after[step][0][0])
        assert moved == (float(_global(g)) <= 0.3)
    assert any(float(_global(g)) > 0.3 for g in raw.grads)


def test_refuses_trainer_gradient_clip_val():
    with pytest.raises(ValueError, match="remove gradient_clip_val"):
        _fit([GradientClipping()], gradient_clip_val=1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="l2"), "not one of"), (dict(threshold=0.0), "positive finite"), (dict(norm_type=-1.0), "norm_type"),
    (dict(mode="agc", per_layer=True), "drop per_layer"), (dict(mode="agc", skip_spikes=True), "skip_spikes"),
    (dict(quantile=10.0), r"\[0, 1\]"), (dict(ema_decay=1.0), "ZClip uses"), (dict(skip_method="x"), "skip_method"),
    (dict(max_consecutive_skips=0), "max_consecutive_skips"),
])
def test_bad_configuration_is_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientClipping(**kwargs)


def test_found_inf_needs_a_fused_optimizer():
    with pytest.raises(ValueError, match="fused=True"):
        _fit([GradientClipping(skip_method="found_inf")], steps=1)


def test_resume_keeps_thresholds_and_histories(tmp_path):
    def run(epochs, ckpt=None, save=None):
        seed_everything(0)
        clip = GradientClipping(mode="zscore", warmup_steps=3, history_size=5)
        model = _model()
        trainer = tiny_trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=0, callbacks=[clip])
        trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=32), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return clip, model

    straight, model_a = run(3)
    run(2, save=tmp_path / "two.ckpt")
    resumed, model_b = run(3, ckpt=tmp_path / "two.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["steps"] == b["steps"] == 9
    for key in a["tensors"]:
        torch.testing.assert_close(a["tensors"][key], b["tensors"][key], equal_nan=True, rtol=0, atol=0)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))


class Manual(LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]) * 100)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=16)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_optimization_and_bf16_are_clipped_and_guarded(precision):
    raw, post, snaps = Grads(), Grads(), Snapshots()
    trainer = tiny_trainer(max_steps=4, callbacks=[_poison({2}), raw, GradientClipping(threshold=0.5), post, snaps],
                           precision=precision)
    trainer.fit(Manual())
    assert len(post.grads) == 4
    for step in (0, 1, 3):
        assert float(_global(raw.grads[step])) > 0.5
        torch.testing.assert_close(post.grads[step], _torch_clip(raw.grads[step], 0.5), rtol=1e-5, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(snaps.before[2][0], snaps.after[2][0], strict=True))
    _same_state(snaps.before[2][1], snaps.after[2][1])


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adam", "adamw_fused"])
def test_a_non_finite_step_is_skipped_bit_identically_on_gpu(optimizer):
    snaps = Snapshots()
    _fit([_poison({0, 3}), GradientClipping(), snaps], model=_model(OPTIMIZERS[optimizer]), steps=5,
         accelerator="gpu")
    for step in (0, 3):
        assert all(torch.equal(a, b) for a, b in zip(snaps.before[step][0], snaps.after[step][0], strict=True))
        _same_state(snaps.before[step][1], snaps.after[step][1])


# ---------------------------------------------------------------- several optimizers (a GAN, manual optimization)
class GAN(LightningModule):
    """Generator and discriminator, each with a BatchNorm; two optimizers stepped by hand: D first, then G."""

    def __init__(self, method_lr=1e-2):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 2))
        self.D = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.LeakyReLU(0.2),
                                     torch.nn.Linear(16, 1))
        self.lr = method_lr

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 4, generator=torch.Generator().manual_seed(batch_idx)).to(real.device)
        fake = self.G(z)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ones, zeros = real.new_ones(len(real), 1), real.new_zeros(len(real), 1)
        d_loss = 20 * (bce(self.D(real), ones) + bce(self.D(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = 20 * bce(self.D(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.G.parameters(), lr=self.lr), torch.optim.Adam(self.D.parameters(), lr=self.lr))

    def train_dataloader(self):
        data = torch.randn(160, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 2.0
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16)


class PerOptimizer(Callback):
    """Each optimizer step's gradients, by optimizer index, where it sits in the callback list."""

    def __init__(self):
        self.grads = []  # (batch, optimizer index, [grads])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        index = [id(o) for o in trainer.optimizers].index(id(optimizer))
        grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.grads.append((trainer.fit_loop.epoch_loop.batch_idx, index, grads))


class PoisonBatch(Callback):
    """Writes NaN into the first input of the given training batches (before the forward pass)."""

    def __init__(self, batches):
        self.batches = set(batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            batch[0][0, 0] = math.nan


class Buffers(Callback):
    """Parameters, buffers and optimizer states at the start and at the end of every batch."""

    def __init__(self):
        self.before, self.after = [], []

    def _take(self, trainer, pl_module):
        return ({n: b.clone() for n, b in pl_module.named_buffers()},
                {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                [copy.deepcopy(o.state_dict()["state"]) for o in trainer.optimizers])

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before.append(self._take(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(self._take(trainer, pl_module))


@pytest.mark.parametrize("method", ["sync", "snapshot"])
def test_gan_clips_each_optimizer_by_its_own_norm_and_logs_it_per_optimizer(method, tmp_path):
    raw, post = PerOptimizer(), PerOptimizer()
    clip = GradientClipping(threshold=1.0, skip_method=method)
    trainer = tiny_trainer(max_epochs=1, log_every_n_steps=2, logger=CSVLogger(tmp_path, name="gan"),
                           callbacks=[raw, clip, post])
    trainer.fit(GAN())
    assert trainer.global_step == 20  # 10 batches, 2 optimizer steps each
    assert [(b, i) for b, i, _ in raw.grads] == [(b, i) for b in range(10) for i in (1, 0)]  # D, then G
    clipped = set()
    for (_, index, g), (_, _, ours) in zip(raw.grads, post.grads, strict=True):
        for got, want in zip(ours, _torch_clip(g, 1.0), strict=True):  # the optimizer's own parameters only
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        if float(_global(g)) > 1.0:
            clipped.add(index)
    assert clipped == {0, 1}  # both were clipped at least once: the comparison is not vacuous
    rows = [r for r in _metrics(tmp_path) if r.get("grad/norm_pre/opt0")]
    # an even interval logs every 2nd batch (batches that stepped), not every 2nd optimizer step
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7, 9]
    assert not any(r.get("grad/norm_pre") for r in _metrics(tmp_path))  # no unsuffixed key with two optimizers
    norms = {(b, i): float(_global(g)) for b, i, g in raw.grads}
    for row in rows:
        batch = int(row["step"])
        for index in (0, 1):
            pre = norms[batch, index]
            assert float(row[f"grad/norm_pre/opt{index}"]) == pytest.approx(pre, rel=1e-5)
            assert float(row[f"grad/norm_post/opt{index}"]) == pytest.approx(min(pre, 1.0), rel=1e-5)
            assert float(row[f"grad/clip_coef/opt{index}"]) == pytest.approx(min(1.0, 1.0 / pre), rel=1e-4)
            window = [norms[b, index] > 1.0 for b in (batch - 1, batch)]
            assert float(row[f"grad/clipped_frac/opt{index}"]) == pytest.approx(sum(window) / 2)
    state = clip.state_dict()
    assert state["steps"] == 10 and [o["steps"] for o in state["optimizers"]] == [10]


@pytest.mark.parametrize("method", ["sync", "snapshot"])
def test_gan_nan_batch_skips_the_discriminator_and_keeps_its_batchnorm(method):
    snaps = Buffers()
    clip = GradientClipping(threshold=1.0, skip_method=method)
    trainer = tiny_trainer(max_steps=8, callbacks=[PoisonBatch({2}), clip, snaps])
    trainer.fit(GAN())
    (buf0, par0, opt0), (buf1, par1, opt1) = snaps.before[2], snaps.after[2]
    for name in buf0:  # the discriminator saw the NaN: its statistics and counter are as before the batch
        if name.startswith("D."):
            assert torch.equal(buf0[name], buf1[name]), name
        elif name.endswith("num_batches_tracked"):  # the generator stepped: its statistics moved on
            assert int(buf1[name]) == int(buf0[name]) + 1
    assert all(torch.equal(par0[n], par1[n]) for n in par0 if n.startswith("D."))
    assert not torch.equal(par0["G.0.weight"], par1["G.0.weight"])
    _same_state(opt0[1], opt1[1])  # Adam's moments and step counts of D untouched
    state = clip.state_dict()
    assert int(state["tensors"]["skipped"]) == 0 and int(state["optimizers"][0]["tensors"]["skipped"]) == 1
    assert all(torch.isfinite(b).all() for b in trainer.lightning_module.buffers())


def test_gan_no_host_sync_outside_logging_steps():
    window = SyncWindow()
    with count_host_syncs(window.current, window.enabled):
        tiny_trainer(max_steps=16, log_every_n_steps=4, logger=CSVLogger(".", name="g"),
                     callbacks=[window, GradientClipping(skip_method="snapshot")]).fit(GAN())
    by_batch = dict(enumerate(window.counts.values()))
    assert by_batch[0] == {"item": 2}  # both optimizers create their state at their first step: one read each
    assert by_batch[3] and by_batch[7]  # logging batches copy (the counter works)
    quiet = {b: c for b, c in by_batch.items() if b % 4 != 3 and b != 0}
    assert quiet and all(not c for c in quiet.values()), quiet


# ---------------------------------------------------------------- buffers of a skipped step (BatchNorm)
class BNNet(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,),
                                                                                                   generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


@pytest.mark.parametrize("method, precision, accumulate", [
    ("sync", "32-true", 1), ("snapshot", "32-true", 1), ("snapshot", "bf16-mixed", 1), ("sync", "32-true", 3),
    ("snapshot", "32-true", 3),
])
def test_a_nan_batch_leaves_batchnorm_statistics_bit_identical(method, precision, accumulate):
    snaps = Buffers()
    bad = 2 if accumulate == 1 else 4  # with accumulation: the 2nd micro-batch of the window [3, 4, 5]
    trainer = tiny_trainer(max_steps=4, precision=precision, accumulate_grad_batches=accumulate,
                           callbacks=[PoisonBatch({bad}), GradientClipping(skip_method=method), snaps])
    trainer.fit(BNNet())
    first = bad - (bad % accumulate)  # the window's first micro-batch
    last = first + accumulate - 1
    (buf0, par0, opt0), (buf1, par1, opt1) = snaps.before[first], snaps.after[last]
    assert buf0.keys() == buf1.keys() and len(buf0) == 3
    for name in buf0:  # running_mean, running_var, num_batches_tracked: as at the start of the window
        assert torch.equal(buf0[name], buf1[name]), name
    assert all(torch.equal(par0[n], par1[n]) for n in par0)
    _same_state(opt0[0], opt1[0])
    after = snaps.after[-1][0]  # healthy windows still update them
    assert int(after["net.1.num_batches_tracked"]) == accumulate * 3
    assert all(torch.isfinite(b).all() for b in after.values())


def test_restore_buffers_false_leaves_the_bad_batch_in_batchnorm():
    snaps = Buffers()
    tiny_trainer(max_steps=3, callbacks=[PoisonBatch({1}), GradientClipping(restore_buffers=False), snaps]).fit(
        BNNet())
    assert torch.isnan(snaps.after[1][0]["net.1.running_mean"]).all()  # the poisoning the guard prevents


class BatchSyncs(Callback):
    """Host syncs of each training batch (micro-batches apart), from batch start to batch end."""

    def __init__(self):
        self.counts, self.current, self.enabled = [], {}, [False]

    def on_train_batch_start(self, *args):
        self.current.clear()
        self.enabled[0] = True

    def on_train_batch_end(self, *args):
        self.enabled[0] = False
        self.counts.append(dict(self.current))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_buffer_guard_adds_no_host_sync(accumulate):
    window = BatchSyncs()
    with count_host_syncs(window.current, window.enabled):
        tiny_trainer(max_steps=8, max_epochs=3, log_every_n_steps=4, accumulate_grad_batches=accumulate, logger=CSVLogger(
            ".", name="bn"), callbacks=[window, GradientClipping(skip_method="snapshot")]).fit(BNNet())
    counts = window.counts
    assert len(counts) == 8 * accumulate
    first_step = accumulate - 1
    assert counts[first_step] == {"item": 1}  # Adam creates its state: documented
    # logging windows: Lightning logs every micro-batch of a window whose step is a logging step (4th, 8th)
    logging = {b for b in range(len(counts)) if (b // accumulate + 1) % 4 == 0}
    assert all(counts[b] for b in logging if b % accumulate == accumulate - 1)  # the counter works
    quiet = [c for b, c in enumerate(counts) if b not in logging and b != first_step]
    assert quiet and all(not c for c in quiet), counts


def test_gan_consecutive_skips_restore_only_that_optimizers_snapshot():
    class PoisonD(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if optimizer is trainer.optimizers[1] and trainer.fit_loop.epoch_loop.batch_idx in (4, 5):
                next(pl_module.D.parameters()).grad.view(-1)[0] = math.nan

    snaps = Buffers()
    clip = GradientClipping(max_consecutive_skips=2, on_consecutive_skips="restore", skip_method="snapshot")
    tiny_trainer(max_steps=16, log_every_n_steps=2, callbacks=[PoisonD(), clip, snaps]).fit(GAN())
    # batch 3 logged healthy: D's snapshot holds D before its step there; batch 5 (logging) restored it
    healthy, restored = snaps.before[3], snaps.after[5]
    assert all(torch.equal(healthy[1][n], restored[1][n]) for n in healthy[1] if n.startswith("D."))
    _same_state(healthy[2][1], restored[2][1])
    assert not torch.equal(healthy[1]["G.0.weight"], restored[1]["G.0.weight"])  # G trained on, untouched
    assert not torch.equal(snaps.after[7][1]["D.0.weight"], healthy[1]["D.0.weight"])  # and D trains again


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_nan_batch_keeps_batchnorm_and_the_gan_discriminator_on_gpu(fused):
    """On a GPU auto picks snapshot (non-fused) or found_inf (fused): buffers are restored by the device flag."""
    snaps = Buffers()
    tiny_trainer(max_steps=4, accelerator="gpu", callbacks=[PoisonBatch({2}), GradientClipping(), snaps]).fit(BNNet())
    (buf0, par0, opt0), (buf1, par1, opt1) = snaps.before[2], snaps.after[2]
    assert all(torch.equal(buf0[n], buf1[n]) for n in buf0) and all(torch.equal(par0[n], par1[n]) for n in par0)
    _same_state(opt0[0], opt1[0])
    gan, snaps = GAN(), Buffers()
    if fused:
        gan.configure_optimizers = lambda: (torch.optim.Adam(gan.G.parameters(), lr=1e-2, fused=True),
                                            torch.optim.Adam(gan.D.parameters(), lr=1e-2, fused=True))
    tiny_trainer(max_steps=8, accelerator="gpu", callbacks=[PoisonBatch({2}), GradientClipping(), snaps]).fit(gan)
    (buf0, par0, opt0), (buf1, par1, opt1) = snaps.before[2], snaps.after[2]
    assert all(torch.equal(buf0[n], buf1[n]) for n in buf0 if n.startswith("D."))
    assert all(torch.equal(par0[n], par1[n]) for n in par0 if n.startswith("D."))
    _same_state(opt0[1], opt1[1])


def test_the_norm_all_reduce_is_a_no_op_without_a_group_or_a_process_group():
    from traincraft.strategies._collectives import all_reduce_

    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t, "sum", None) is t and t.tolist() == [1.0, 2.0]
    assert all_reduce_(t, "max", object()) is t and t.tolist() == [1.0, 2.0]  # torch.distributed not initialized

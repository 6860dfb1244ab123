"""LearningRateMonitor: Lightning's, key for key and error for error, plus extras checked against references."""

import functools
import math

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import LearningRateMonitor as LightningMonitor
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks.lr_monitor import LearningRateMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class Recorder(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))


class TwoOptimizers(LightningModule):
    """Manual optimization with two SGD optimizers, one with a named scheduler."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch[0].flatten(1), batch[1]
        for opt, layer in zip(self.optimizers(), (self.a, self.b), strict=False):
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(layer(x), y))
            opt.step()

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        first = torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.5)
        second = torch.optim.SGD([{"params": [self.b.weight]}, {"params": [self.b.bias], "lr": 0.01}], lr=0.05)
        sched = {"scheduler": torch.optim.lr_scheduler.StepLR(first, 1, gamma=0.5), "name": "my-schedule",
                 "interval": "epoch"}
        return [first, second], [sched]


def _classifier(optimizer, scheduler=None, interval="step", multipliers=None):
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, optimizer=optimizer,
                           scheduler=scheduler, scheduler_interval=interval, lr_multipliers=multipliers)


CONFIGS = {
    "sgd-momentum-named-groups": lambda: _classifier(
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
        functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
        multipliers={"head.*": 0.1, "blocks.0.*": 2.0}),
    "adam-no-scheduler": lambda: _classifier(functools.partial(torch.optim.Adam, lr=1e-3)),
    "adamw-epoch-scheduler": lambda: _classifier(
        functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05),
        functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9), interval="epoch",
        multipliers={"head.*": 0.5}),
    "two-optimizers": TwoOptimizers,
}
CASES = [
    ("sgd-momentum-named-groups", dict(logging_interval=None, log_momentum=True, log_weight_decay=True)),
    ("adam-no-scheduler", dict(logging_interval="step", log_momentum=True)),
    ("adamw-epoch-scheduler", dict(logging_interval="epoch", log_momentum=True, log_weight_decay=True)),
    ("two-optimizers", dict(logging_interval=None, log_momentum=True, log_weight_decay=True)),
]


def _run(monitor, build, max_epochs=2, **trainer_kwargs):
    seed_everything(0)
    logger = Recorder()
    trainer = tiny_trainer(max_epochs=max_epochs, limit_train_batches=4, log_every_n_steps=2, limit_val_batches=0,
                           logger=logger, callbacks=[monitor], **trainer_kwargs)
    trainer.fit(build(), datamodule=DigitsDataModule(image_size=8, batch_size=32, augment="none"))
    return logger.rows, trainer


@pytest.mark.parametrize("config, args", CASES, ids=lambda c: c if isinstance(c, str) else str(c["logging_interval"]))
def test_drop_in_logs_the_same_keys_and_values_as_lightning(config, args):
    theirs, _ = _run(LightningMonitor(**args), CONFIGS[config])
    ours, _ = _run(LearningRateMonitor(**args), CONFIGS[config])
    assert ours == theirs
    lr_keys = {k for _, row in theirs for k in row if k.startswith(("lr-", "my-schedule"))}
    assert lr_keys  # the comparison covered learning-rate keys
    # with every extra on, Lightning's keys keep their values and order of appearance
    extras, _ = _run(LearningRateMonitor(**args, log_hyperparameters=True, log_effective_lr=True,
                                         log_update_ratio=True, log_oscillation=True), CONFIGS[config])
    assert [(s, {k: v for k, v in r.items() if k in lr_keys}) for s, r in extras if lr_keys & set(r)] == \
        [(s, {k: v for k, v in r.items() if k in lr_keys}) for s, r in theirs if lr_keys & set(r)]


def test_named_groups_get_lightnings_names():
    rows, _ = _run(LearningRateMonitor(log_momentum=True, log_weight_decay=True), CONFIGS["sgd-momentum-named-groups"],
                   max_epochs=1)
    keys = {k for _, row in rows for k in row}
    assert {"lr-SGD/default", "lr-SGD/head.*", "lr-SGD/blocks.0.*", "lr-SGD/head.*-momentum",
            "lr-SGD/head.*-weight_decay"} <= keys


def _error(callback_factory, **trainer_kwargs):
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback_factory()], **trainer_kwargs)
    with pytest.raises(Exception) as info:
        trainer.fit(CONFIGS["adam-no-scheduler"](), datamodule=DigitsDataModule(image_size=8, augment="none"))
    return type(info.value), str(info.value)


def test_the_same_errors_as_lightning():
    assert _error(LearningRateMonitor, logger=False) == _error(LightningMonitor, logger=False)
    assert "no logger" in _error(LearningRateMonitor, logger=False)[1]
    for cls in (LightningMonitor, LearningRateMonitor):
        with pytest.raises(MisconfigurationException, match="logging_interval should be"):
            cls(logging_interval="batch")

    def duplicated(cls):
        class Module(TwoOptimizers):
            def configure_optimizers(self):
                return torch.optim.SGD([{"params": [self.a.weight], "name": "x"}, {"params": [self.a.bias], "name": "x"}],
                                       lr=0.1)
        seed_everything(0)
        trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[cls()], logger=Recorder())
        with pytest.raises(MisconfigurationException) as info:
            trainer.fit(Module(), datamodule=DigitsDataModule(image_size=8, augment="none"))
        return str(info.value)

    assert duplicated(LearningRateMonitor) == duplicated(LightningMonitor)


def test_extras_are_rejected_when_out_of_range():
    with pytest.raises(ValueError, match=r"oscillation_ema must lie in \[0, 1\); got 1.0"):
        LearningRateMonitor(oscillation_ema=1.0)


class Reference(Callback):
    """Plain-torch reference: the exact update of every step, per group, and the Adam step statistics."""

    def __init__(self, ema):
        self.ema, self.before, self.prev, self.cos, self.flip, self.n = ema, None, None, None, None, 0
        self.expected = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, *args):
        optimizer = trainer.optimizers[0]
        names = [f"lr-AdamW/{g['name']}" for g in optimizer.param_groups]
        updates = [torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(g["params"], bs, strict=False)])
                   for g, bs in zip(optimizer.param_groups, self.before, strict=False)]
        if self.prev is not None:
            cos = [float(torch.dot(u, v) / (u.norm() * v.norm())) for u, v in zip(updates, self.prev, strict=False)]
            flip = [float(((u * v) < 0).float().mean()) for u, v in zip(updates, self.prev, strict=False)]
            self.cos = cos if self.cos is None else [self.ema * a + (1 - self.ema) * b for a, b in zip(self.cos, cos, strict=False)]
            self.flip = flip if self.flip is None else [self.ema * a + (1 - self.ema) * b for a, b in zip(self.flip, flip, strict=False)]
            self.n += 1
        self.prev = updates
        row = {}
        for name, group, u in zip(names, optimizer.param_groups, updates, strict=False):
            weights = torch.cat([p.detach().reshape(-1) for p in group["params"]])
            row[f"{name}-update_ratio"] = float(u.norm() / weights.norm())
            rates = torch.cat([
                (group["lr"] / ((optimizer.state[p]["exp_avg_sq"] / (1 - group["betas"][1] ** optimizer.state[p]["step"]))
                                .sqrt() + group["eps"])).reshape(-1) for p in group["params"]])
            row.update({f"{name}-effective_lr_mean": float(rates.mean()), f"{name}-effective_lr_min": float(rates.min()),
                        f"{name}-effective_lr_max": float(rates.max()), f"{name}-beta1": group["betas"][0],
                        f"{name}-beta2": group["betas"][1], f"{name}-eps": group["eps"],
                        f"{name}-weight_decay": group["weight_decay"]})
        self.expected[trainer.global_step] = row
        self.cos_history = getattr(self, "cos_history", [])
        if self.prev is not None and self.n:
            self.cos_history.append((trainer.global_step, cos, flip))


def _zero_started_ema(history, ema, step):
    values = [(c, f) for s, c, f in history if s <= step]
    n = len(values)
    cos = [sum((1 - ema) * ema ** (n - 1 - i) * v[0][g] for i, v in enumerate(values)) / (1 - ema**n)
           for g in range(len(values[0][0]))]
    flip = [sum((1 - ema) * ema ** (n - 1 - i) * v[1][g] for i, v in enumerate(values)) / (1 - ema**n)
            for g in range(len(values[0][1]))]
    return cos, flip


def test_extras_equal_a_plain_torch_reference():
    monitor = LearningRateMonitor(log_hyperparameters=True, log_effective_lr=True, log_update_ratio=True,
                                  log_oscillation=True, oscillation_ema=0.8)
    reference = Reference(0.8)
    build = functools.partial(_classifier, functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05),
                              multipliers={"head.*": 0.5})
    seed_everything(0)
    logger = Recorder()
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, limit_val_batches=0, logger=logger,
                           callbacks=[reference, monitor])
    trainer.fit(build(), datamodule=DigitsDataModule(image_size=8, batch_size=32, augment="none"))
    logged = {}
    for step, row in logger.rows:
        logged.setdefault(step, {}).update(row)
    for step in (4, 8):
        got = logged[step - 1]  # Lightning's logger step counts from 0
        for key, value in reference.expected[step].items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
        cos, flip = _zero_started_ema(reference.cos_history, 0.8, step)
        for g, name in enumerate(["default", "head.*"]):
            assert got[f"lr-AdamW/{name}-update_cosine"] == pytest.approx(cos[g], rel=1e-4, abs=1e-6)
            assert got[f"lr-AdamW/{name}-sign_flip"] == pytest.approx(flip[g], rel=1e-4, abs=1e-6)
            assert -1 <= cos[g] <= 1 and math.isfinite(flip[g])


def test_no_host_sync_on_non_logging_steps():
    window = SyncWindow()
    counts, current, enabled = window.counts, window.current, window.enabled

    monitor = LearningRateMonitor(log_hyperparameters=True, log_effective_lr=True, log_update_ratio=True,
                                  log_oscillation=True)
    # SyncWindow first: its end hook closes the window before the monitor's logging-step copy
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, limit_val_batches=0, logger=CSVLogger(".", name="s"),
                           callbacks=[window, monitor])
    with count_host_syncs(current, enabled):
        trainer.fit(_classifier(functools.partial(torch.optim.Adam, lr=1e-3)),
                    datamodule=DigitsDataModule(image_size=8, augment="none"))
    assert len(counts) == 8
    quiet = {step: c for step, c in counts.items() if step % 4 != 0}
    assert quiet and all(not c for c in quiet.values()), quiet


def test_contract_with_a_logger_and_checkpointed_oscillation_state(tmp_path):
    """The shared contract fits once without a logger, which Lightning's monitor (hence ours) refuses: the rest of
    it (fit twice, checkpoint round trip with weights_only, resume) runs here with a logger."""
    monitor = LearningRateMonitor(log_oscillation=True)
    first, _ = _run(monitor, CONFIGS["adam-no-scheduler"], max_epochs=1)
    _, trainer = _run(monitor, CONFIGS["adam-no-scheduler"], max_epochs=1)  # the same instance fits again
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][monitor.state_key]
    assert state["tracker0"]["comparisons"] == 3 and state["tracker0"]["cosine_ema"].shape == (1,)
    fresh = LearningRateMonitor(log_oscillation=True)
    seed_everything(0)
    resumed = tiny_trainer(max_epochs=2, limit_train_batches=6, log_every_n_steps=2, limit_val_batches=0,
                           logger=Recorder(), callbacks=[fresh])
    resumed.fit(CONFIGS["adam-no-scheduler"](), datamodule=DigitsDataModule(image_size=8, batch_size=32,
                                                                            augment="none"), ckpt_path=path)
    assert resumed.global_step == 4 + 6
    # continued, not restarted; the first step after resume has no previous update to compare with
    assert fresh.state_dict()["tracker0"]["comparisons"] == 3 + 5

"""LearningRateGovernor on quadratics whose behaviour is known in closed form, with schedulers, and resumed."""

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import MemoryLogger, SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks import _lr_updates
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.callbacks.lr_governor import LearningRateGovernor
from traincraft.callbacks.lr_monitor import LearningRateMonitor


class Quadratic(LightningModule):
    """L = ½ Σ λᵢ wᵢ² in two named groups. Gradient descent with η·λ = 1.8 oscillates (updates flip sign, cosine
    -1); with η·λ = 0.1 every update points the same way (cosine +1)."""

    def __init__(self, curvature_a=18.0, curvature_b=1.0, lr=0.1, scheduler=None):
        super().__init__()
        # large start: near η = 1/λ the weights shrink ~10x per step and fp32 updates would underflow by step 40
        self.a = torch.nn.Parameter(torch.full((8,), 1e12))
        self.b = torch.nn.Parameter(torch.full((8,), 1e12))
        self.register_buffer("ca", torch.full((8,), curvature_a))
        self.register_buffer("cb", torch.full((8,), curvature_b))
        self.lr, self.scheduler = lr, scheduler

    def probe_loss(self, batch):
        return 0.5 * (self.ca * self.a**2).sum() + 0.5 * (self.cb * self.b**2).sum()

    def training_step(self, batch, batch_idx):
        return self.probe_loss(batch)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": [self.a], "name": "a"}, {"params": [self.b], "name": "b"}], lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def _fit(callbacks, module=None, max_steps=20, log_every_n_steps=5, ckpt_path=None):
    seed_everything(0)
    trainer = tiny_trainer(max_steps=max_steps, log_every_n_steps=log_every_n_steps, callbacks=callbacks)
    trainer.fit(module or Quadratic(), ckpt_path=ckpt_path)
    return trainer


def _reference_factors(curvatures, lr, steps, every, down, up, max_factor, warmup, ema=0.9, low=-0.2, high=0.3):
    """The governor's rule, simulated in plain Python: scalar gradient descent per group (all weights alike)."""
    factors, w, previous, cos_ema, n = [1.0] * len(curvatures), [1.0] * len(curvatures), [None] * len(curvatures), \
        [0.0] * len(curvatures), 0
    for step in range(1, steps + 1):
        updates = [-lr * f * c * x for f, c, x in zip(factors, curvatures, w, strict=False)]
        w = [x + u for x, u in zip(w, updates, strict=False)]
        if previous[0] is not None:
            cos = [1.0 if u * p > 0 else -1.0 if u * p < 0 else 0.0 for u, p in zip(updates, previous, strict=False)]
            cos_ema = [ema * e + (1 - ema) * c for e, c in zip(cos_ema, cos, strict=False)]
            n += 1
        previous = updates
        if step >= warmup and step % every == 0:
            for i, e in enumerate(cos_ema):
                e = e / (1 - ema**n)
                step_factor = down if e < low else up if e > high else 1.0
                factors[i] = min(max(factors[i] * step_factor, 0.01), max_factor)
    return factors


def test_oscillating_group_goes_down_and_steady_group_goes_up():
    governor = LearningRateGovernor(down=0.5, up=1.25, max_factor=2.0, warmup_steps=5)
    _fit([governor], max_steps=30)
    # decisions at steps 5, 10, ..., 30; group a starts at η·λ = 1.8 (oscillating), group b at 0.1 (steady)
    expected = _reference_factors([18.0, 1.0], 0.1, 30, 5, 0.5, 1.25, 2.0, 5)
    assert governor.decisions == 6
    assert [governor.factors["SGD/a"], governor.factors["SGD/b"]] == pytest.approx(expected)
    assert governor.factors["SGD/a"] < 1 and governor.factors["SGD/b"] == 2.0
    # the oscillating group is steered to a rate near its best one, 1/λ: η·f·λ within a step of 1
    assert 0.5 <= 0.1 * governor.factors["SGD/a"] * 18.0 <= 1.25 / 0.5


def test_sharpness_from_a_curvature_monitor_turns_every_group_down():
    """η·λ_max = 0.1·1 = 0.1 against threshold 2 (ratio 0.05): steady, but above a sharpness_threshold of 0.01."""
    monitor = CurvatureMonitor(every_n_steps=5, first_iterations=50)
    governor = LearningRateGovernor(down=0.5, up=1.25, warmup_steps=5, sharpness_threshold=0.01)
    _fit([monitor, governor], Quadratic(curvature_a=1.0, curvature_b=1.0))
    assert monitor.last["stability_ratio"].item() == pytest.approx(0.05, rel=1e-4)
    assert governor.factors == {"SGD/a": pytest.approx(0.5**4), "SGD/b": pytest.approx(0.5**4)}
    steady = LearningRateGovernor(down=0.5, up=1.25, warmup_steps=5)  # no monitor: steady means up
    _fit([steady], Quadratic(curvature_a=1.0, curvature_b=1.0))
    assert steady.factors == {"SGD/a": pytest.approx(1.25**4), "SGD/b": pytest.approx(1.25**4)}


class UsedRates(Callback):
    """Records the rate each step really used (its pre-hook runs after the governor's) and the scheduler's."""

    def __init__(self):
        self.used, self.scheduled = [], []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_pre_hook(
            lambda opt, *_: self.used.append([g["lr"] for g in opt.param_groups]))

    def on_train_batch_end(self, trainer, *args):
        self.scheduled.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_composes_with_a_chainable_scheduler_without_compounding():
    def schedule(opt):
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)  # chainable: lr ← lr·γ from the group's lr

    governor = LearningRateGovernor(warmup_steps=1000)  # no decisions: the factor stays as loaded
    governor.load_state_dict({"factors": {"SGD/a": 0.5, "SGD/b": 3.0}, "decisions": 0})
    rates = UsedRates()
    _fit([governor, rates], Quadratic(curvature_a=1.0, lr=0.01, scheduler=schedule), max_steps=6)
    for t, (used, scheduled) in enumerate(zip(rates.used, rates.scheduled, strict=False)):
        assert used == pytest.approx([0.01 * 0.9**t * 0.5, 0.01 * 0.9**t * 3.0])
        assert scheduled == pytest.approx([0.01 * 0.9 ** (t + 1)] * 2)  # the scheduler never saw the factor


def test_factor_is_checkpointed_and_resumed(tmp_path):
    governor = LearningRateGovernor(down=0.5, up=1.25, max_factor=2.0, warmup_steps=5)
    trainer = _fit([governor], max_steps=10)
    path = tmp_path / "g.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][governor.state_key]
    expected = _reference_factors([18.0, 1.0], 0.1, 10, 5, 0.5, 1.25, 2.0, 5)
    assert state["decisions"] == 2 and [state["factors"]["SGD/a"], state["factors"]["SGD/b"]] == pytest.approx(expected)
    fresh = LearningRateGovernor(down=0.5, up=1.25, max_factor=2.0, warmup_steps=5)
    module = Quadratic()
    trainer = tiny_trainer(max_steps=20, max_epochs=-1, log_every_n_steps=5, callbacks=[fresh])
    trainer.fit(module, ckpt_path=path)
    assert fresh.decisions == 4 and fresh.factors["SGD/a"] != state["factors"]["SGD/a"]  # it went on from there


def test_a_monitor_and_a_governor_share_one_copy_of_the_weights(monkeypatch):
    """Both read the updates of the same optimizer: one tracker (two flat copies of the weights), not one each, and
    the cosine each logs is the same number (both smooth with 0.9)."""
    made = []
    build = _lr_updates.UpdateTracker.__init__

    def counted(self, optimizer):
        made.append(optimizer)
        build(self, optimizer)

    monkeypatch.setattr(_lr_updates.UpdateTracker, "__init__", counted)
    monitor = LearningRateMonitor(log_update_ratio=True, log_oscillation=True)
    governor = LearningRateGovernor(warmup_steps=5)
    logger = MemoryLogger()
    seed_everything(0)
    tiny_trainer(max_steps=20, log_every_n_steps=5, callbacks=[monitor, governor], logger=logger).fit(Quadratic())
    assert len(made) == 1
    logged = {}
    for _, row in logger.rows:
        logged.update(row)
    for group in ("a", "b"):
        assert logged[f"lr-SGD/{group}-update_cosine"] == pytest.approx(logged[f"governor/SGD/{group}/update_cosine"])
        assert logged[f"lr-SGD/{group}-update_ratio"] > 0
    assert not _lr_updates._TRACKERS  # both let go at the end of the fit: the weight copies go with them


def test_no_host_sync_on_non_logging_steps():
    window = SyncWindow()
    counts, current, enabled = window.counts, window.current, window.enabled

    with count_host_syncs(current, enabled):
        _fit([window, LearningRateGovernor(warmup_steps=0)], max_steps=10, log_every_n_steps=5)
    quiet = {step: c for step, c in counts.items() if step % 5 != 0}
    assert len(quiet) == 8 and all(not c for c in quiet.values()), quiet


@pytest.mark.parametrize("kwargs, match", [
    ({"down": 1.0}, r"down must be in \(0, 1\); got 1.0"),
    ({"up": 0.9}, "up must be >= 1"),
    ({"oscillation_threshold": 0.5, "steady_threshold": 0.2}, "steady_threshold must be in"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearningRateGovernor(**kwargs)


_DDP_SCRIPT = '''
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.callbacks.lr_governor import LearningRateGovernor
from traincraft.callbacks.lr_monitor import LearningRateMonitor


class Scaled(pl.LightningModule):
    """L = ½·mean(c)·Σw² with c from the batch: rank 0 reads c = 1, rank 1 reads c = 3 (even/odd samples)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 1e6))

    def probe_loss(self, batch):
        return 0.5 * batch[0].mean() * (self.w ** 2).sum()

    def training_step(self, batch, batch_idx):
        return self.probe_loss(batch)

    def train_dataloader(self):
        values = torch.tensor([1.0, 3.0] * 64).unsqueeze(1)
        sampler = torch.utils.data.DistributedSampler(TensorDataset(values), shuffle=False)
        return DataLoader(TensorDataset(values), batch_size=4, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    monitor = CurvatureMonitor(every_n_steps=5, first_iterations=30)
    governor = LearningRateGovernor(down=0.5, up=1.25, warmup_steps=5, sharpness_threshold=0.12)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=10, log_every_n_steps=5,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[monitor, governor])
    trainer.fit(Scaled())
    torch.save({"factors": governor.factors, "ratio": monitor.last["stability_ratio"].item()},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
'''


def test_ranks_with_different_signals_take_the_same_decision_in_ddp(tmp_path):
    """Two gloo processes whose probe batches give stability ratios 0.05 and 0.15 around a threshold of 0.12:
    alone, rank 1 would lower its rate; on the reduced mean (0.10) both ranks raise it (steady updates)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_governor.py"
    script.write_text(_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["ratio"] == pytest.approx(0.05, rel=1e-3) and ranks[1]["ratio"] == pytest.approx(0.15, rel=1e-3)
    assert ranks[0]["factors"] == ranks[1]["factors"] == {"SGD": pytest.approx(1.25**2)}


class _UpdatesAndRates(Callback):
    """Placed after the governor: every optimizer step's update per group and the rate it stepped with (read by a
    step pre-hook registered after the governor's, so it sees scheduled lr × factor)."""

    def __init__(self):
        self.updates: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.used: dict[tuple[int, int], list[float]] = {}
        self._before: dict[int, list[torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        for index, optimizer in enumerate(trainer.optimizers):
            optimizer.register_step_pre_hook(lambda opt, a, k, i=index: self._pre(i, opt))
            optimizer.register_step_post_hook(lambda opt, a, k, i=index: self._post(i, opt))

    def _pre(self, index, optimizer):
        self._before[index] = [torch.cat([p.detach().double().reshape(-1) for p in g["params"]])
                               for g in optimizer.param_groups]
        for g, group in enumerate(optimizer.param_groups):
            self.used.setdefault((index, g), []).append(float(group["lr"]))

    def _post(self, index, optimizer):
        for g, group in enumerate(optimizer.param_groups):
            after = torch.cat([p.detach().double().reshape(-1) for p in group["params"]])
            self.updates.setdefault((index, g), []).append(after - self._before[index][g])


def _cosine_ema(updates, upto, ema=0.9):
    """The bias-corrected EMA of cos(Δθₜ, Δθₜ₋₁) over the first ``upto`` updates."""
    value, n = 0.0, 0
    for current, previous in zip(updates[1:upto], updates[: upto - 1], strict=True):
        cos = float(current @ previous / (current.norm() * previous.norm()))
        value, n = ema * value + (1 - ema) * cos, n + 1
    return value / (1 - ema**n)


@pytest.mark.parametrize(("model", "setting"), [("gan", "fp32"), ("mlp", "accumulate"), ("mlp", "bf16-mixed")])
def test_decides_on_lightnings_logging_steps_from_the_recorded_updates(model, setting):
    """A two-optimizer GAN with an even interval (global_step moves by 2 per batch), accumulation and bf16: one
    decision per logging step, from the cosine EMA of the real updates, and the next steps use scheduled lr × f."""
    from lightning.pytorch import Trainer

    from tests.compat._cells import STEPPED_BATCHES, trainer_kwargs
    from tests.compat.zoo import build

    seed_everything(0)
    module, _ = build(model)
    governor = LearningRateGovernor(warmup_steps=0, down=0.5, up=1.5, oscillation_threshold=-0.99,
                                    steady_threshold=-0.98)  # every decision goes up: the factor must show
    record = _UpdatesAndRates()
    kwargs = {**trainer_kwargs(model, setting), "limit_val_batches": 0, "logger": False}
    trainer = Trainer(callbacks=[governor, record], **kwargs)
    trainer.fit(module)
    assert governor.decisions == STEPPED_BATCHES // 2  # stepped batches 2 and 4
    names = ["SGD", "SGD-1"] if model == "gan" else ["SGD"]
    assert sorted(governor.factors) == names and all(f == pytest.approx(2.25) for f in governor.factors.values())
    for (index, g), updates in record.updates.items():
        assert len(updates) == STEPPED_BATCHES
        name = names[index]
        logged = trainer.callback_metrics[f"governor/{name}/update_cosine"].item()
        assert logged == pytest.approx(_cosine_ema(updates, STEPPED_BATCHES), rel=1e-4, abs=1e-6)
        used = record.used[(index, g)]
        group = trainer.optimizers[index].param_groups[g]
        scheduled = group.get("initial_lr", group["lr"])  # BoringModel's StepLR steps only at the epoch's end
        # steps 1-2 at f = 1, 3-4 at f = 1.5 (the decision after stepped batch 2)
        assert used == pytest.approx([scheduled, scheduled, 1.5 * scheduled, 1.5 * scheduled], rel=1e-6)

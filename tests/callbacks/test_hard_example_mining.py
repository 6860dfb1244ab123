"""HardExampleMining through real Trainers: the EMA equals a replay of the recorded losses, hard examples are drawn
more often, no host sync on non-logging steps, an epoch-boundary resume draws and trains exactly as an
uninterrupted run, and bad input fails with errors that say what to do."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks import HardExampleMining
from traincraft.data import DigitsDataModule, EpochShuffleSampler, collate_batched
from traincraft.metrics.hard_examples import hard_example_probabilities, sampling_summary
from traincraft.modules import ImageClassifier

BATCH = 64


def _data(**kwargs):
    return DigitsDataModule(image_size=8, batch_size=BATCH, augment="none", **kwargs)


def _model(**kwargs):
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [32]},
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), **kwargs)


class Recorder(Callback):
    """What each epoch drew and the losses each batch produced, mapped to examples by batch_idx × batch size."""

    def __init__(self, mining):
        self.mining, self.epochs = mining, []

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = self.mining.sampler
        self.epochs.append({"epoch": trainer.current_epoch, "probabilities": sampler.probabilities.clone(),
                            "loss_ema": sampler.loss_ema.clone(), "indices": [], "losses": []})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sampler, record = self.mining.sampler, self.epochs[-1]
        if batch_idx == 0:
            record["draw"], record["rank_indices"] = sampler.epoch_draw().clone(), sampler.indices.clone()
        indices = sampler.indices[batch_idx * BATCH : (batch_idx + 1) * BATCH]
        # the batch really holds these examples
        assert torch.equal(batch[1].cpu(), trainer.datamodule.datasets["train"].labels[indices])
        record["indices"].append(indices.clone())
        record["losses"].append(outputs["per_example_loss"].detach().cpu().clone())


def _replay_ema(epochs, n, decay):
    """The per-example loss EMA by hand (float64) from the recorded losses: mean per epoch, blended when seen."""
    ema, seen = np.zeros(n), np.zeros(n, dtype=bool)
    for record in epochs:
        sums, counts = np.zeros(n), np.zeros(n)
        np.add.at(sums, torch.cat(record["indices"]).numpy(), torch.cat(record["losses"]).double().numpy())
        np.add.at(counts, torch.cat(record["indices"]).numpy(), 1.0)
        now = counts > 0
        mean = sums / np.maximum(counts, 1)
        ema = np.where(now, np.where(seen, decay * ema + (1 - decay) * mean, mean), ema)
        seen |= now
    return ema, seen


def test_ema_probabilities_and_draws_follow_the_recorded_losses():
    seed_everything(0)
    mining = HardExampleMining(decay=0.5, cap=5.0, uniform_mix=0.2)
    recorder = Recorder(mining)
    data = _data()
    trainer = tiny_trainer(max_epochs=3, limit_val_batches=0, callbacks=[mining, recorder])
    trainer.fit(_model(), datamodule=data)
    n = len(data.datasets["train"])
    epochs = recorder.epochs
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    drawn = [torch.cat(r["indices"]) for r in epochs]
    assert all(len(d) == (n // BATCH) * BATCH for d in drawn)  # drop_last: full batches only
    assert len(set(drawn[0].tolist())) == len(drawn[0])  # warm-up epoch: every example at most once
    assert len(set(drawn[2].tolist())) < 0.9 * len(drawn[2])  # later epochs draw with replacement

    # the EMA after every epoch is the hand replay of the losses the batches produced
    for upto in (1, 2, 3):
        ema, seen = _replay_ema(epochs[:upto], n, decay=0.5)
        state = epochs[upto]["loss_ema"] if upto < 3 else mining.sampler.loss_ema
        np.testing.assert_allclose(state.double().numpy(), ema, rtol=1e-5, atol=1e-7)
    assert torch.equal(mining.sampler.seen, torch.from_numpy(seen))

    # epoch 2 drew from the probabilities of that EMA, and hard examples came up more often than uniform
    ema_before, _ = _replay_ema(epochs[:2], n, decay=0.5)
    _, seen_before = _replay_ema(epochs[:2], n, decay=0.5)
    p = epochs[2]["probabilities"]
    expected = hard_example_probabilities(torch.from_numpy(ema_before), 5.0, 0.2, seen=torch.from_numpy(seen_before))
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-12)
    hardest = torch.from_numpy(np.argsort(-ema_before)[: n // 10].copy())
    share = float(p[hardest].sum())
    assert share > 0.2  # the top 10% of losses get more than twice their uniform share ...
    count = int(torch.isin(drawn[2], hardest).sum())
    uniform = len(drawn[2]) / 10
    assert count > 1.8 * uniform, (count, uniform)  # ... and are drawn accordingly
    assert abs(count - share * len(drawn[2])) < 5 * (share * (1 - share) * len(drawn[2])) ** 0.5

    # the logged numbers describe the final distribution
    final = mining.sampler.probabilities
    summary = sampling_summary(final, 5.0)
    metrics = trainer.callback_metrics
    for key in ("max_ratio", "min_ratio", "capped_fraction", "ess_fraction"):
        assert float(metrics[f"hard_examples/{key}"]) == pytest.approx(float(summary[key]), rel=1e-6)
    assert float(metrics["hard_examples/max_ratio"]) <= 5.0 + 1e-6
    assert float(metrics["hard_examples/min_ratio"]) >= 0.2 - 1e-6
    assert float(metrics["hard_examples/loss_ema_mean"]) == pytest.approx(ema[seen].mean(), rel=1e-5)
    assert float(metrics["hard_examples/seen_fraction"]) == pytest.approx(seen.mean())
    assert float(metrics["hard_examples/drawn_fraction"]) == pytest.approx(len(set(drawn[2].tolist())) / n)
    assert float(metrics["hard_examples/nonfinite"]) == 0.0
    # after fit the DataModule shuffles as before
    assert isinstance(data.train_dataloader().sampler, EpochShuffleSampler)


def test_no_host_sync_on_non_logging_steps():
    data = _data()
    window = SyncWindow(datamodule=data)
    trainer = tiny_trainer(max_epochs=2, log_every_n_steps=5, limit_val_batches=0, logger=CSVLogger(".", name="sync"),
                           callbacks=[HardExampleMining(), window])  # the window closes after the mining callback
    with count_host_syncs(window.current, window.enabled):
        trainer.fit(_model(), datamodule=data)
    assert len(window.counts) == 2 * 19
    quiet = {step: c for step, c in window.counts.items() if step % 5 != 0}
    assert quiet and all(not c for c in quiet.values()), {s: c for s, c in quiet.items() if c}


def _run(tmp_path, max_epochs, ckpt_path=None, checkpoint=False):
    seed_everything(0)
    mining = HardExampleMining(decay=0.5, cap=4.0, uniform_mix=0.2)
    recorder = Recorder(mining)
    callbacks = [mining, recorder]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}"))
    trainer = tiny_trainer(max_epochs=max_epochs, limit_val_batches=0, callbacks=callbacks,
                           enable_checkpointing=checkpoint)
    model = _model()
    trainer.fit(model, datamodule=_data(), ckpt_path=ckpt_path)
    return model, mining, recorder


def test_resume_at_an_epoch_boundary_draws_and_trains_like_an_uninterrupted_run(tmp_path):
    model, mining, recorder = _run(tmp_path, max_epochs=3, checkpoint=True)
    resumed_model, resumed_mining, resumed = _run(tmp_path / "r", max_epochs=3, ckpt_path=tmp_path / "epoch=1.ckpt",
                                                  checkpoint=True)
    assert [r["epoch"] for r in resumed.epochs] == [2]
    mine, theirs = recorder.epochs[2], resumed.epochs[0]
    assert torch.equal(mine["probabilities"], theirs["probabilities"])
    assert not torch.equal(mine["probabilities"], recorder.epochs[1]["probabilities"])  # refreshed after epoch 1
    assert torch.equal(mine["draw"], theirs["draw"])
    assert all(torch.equal(a, b) for a, b in zip(mine["losses"], theirs["losses"], strict=True))
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(mining.sampler.loss_ema, resumed_mining.sampler.loss_ema)


def test_the_classifier_returns_its_per_example_losses():
    model = _model(label_smoothing=0.1)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    logits = model(x)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(model.per_example_loss(logits, y), expected)
    torch.testing.assert_close(model.compute_loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))

    class Focal(ImageClassifier):  # overrides the loss only: no per-example losses that would match it
        def compute_loss(self, logits, targets):
            return super().compute_loss(logits, targets) * 2

    class PerExample(Focal):  # ... unless it gives them too
        def per_example_loss(self, logits, targets):
            return super().per_example_loss(logits, targets) * 2

    kwargs = dict(num_classes=10, in_channels=1, input_size=8)
    assert Focal("mlp", **kwargs)._losses(logits, y)[1] is None
    _, per_example = PerExample("mlp", **kwargs)._losses(logits, y)
    torch.testing.assert_close(per_example, 2 * F.cross_entropy(logits, y, reduction="none"))
    assert not per_example.requires_grad


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"cap": 0.9}, "cap must be >= 1"),
    ({"decay": 1.0}, r"decay must lie in \[0, 1\)"),
    ({"decay": -0.5}, r"decay must lie in \[0, 1\)"),
    ({"uniform_mix": 1.01}, r"uniform_mix must lie in \[0, 1\]"),
    ({"uniform_mix": -0.01}, r"uniform_mix must lie in \[0, 1\]"),
    ({"temperature": -1.0}, "temperature must be a positive"),
    ({"epoch_size": 0}, "epoch_size must be None or a positive integer"),
])
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardExampleMining(**kwargs)


def test_a_module_without_per_example_losses_gets_told_what_to_return():
    class MeanOnly(ImageClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    model = MeanOnly("mlp", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(TypeError, match=r"training_step returned a dict with keys \['loss'\].*'per_example_loss': per_"):
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining()]).fit(model, datamodule=_data())


def test_per_example_losses_of_the_wrong_shape_are_rejected():
    class Summed(ImageClassifier):
        def training_step(self, batch, batch_idx):
            outputs = super().training_step(batch, batch_idx)
            return {**outputs, "per_example_loss": outputs["per_example_loss"][:5]}

    model = Summed("mlp", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"one entry per example of the batch, shape \(64,\); got shape \(5,\)"):
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining()]).fit(model, datamodule=_data())


def test_a_datamodule_that_is_not_an_image_datamodule_is_rejected():
    class Plain(LightningDataModule):
        def __init__(self):
            super().__init__()
            self.inner = _data()

        def setup(self, stage):
            self.inner.setup(stage)

        def train_dataloader(self):
            return self.inner.train_dataloader()

    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining()])
    with pytest.raises(TypeError, match="traincraft ImageDataModule; got Plain.*HardExampleSampler"):
        trainer.fit(_model(), datamodule=Plain())
    inner = _data()
    inner.setup("fit")
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining()])
    with pytest.raises(TypeError, match=r"got no datamodule \(loaders passed directly\)"):
        trainer.fit(_model(), train_dataloaders=inner.train_dataloader())



def test_a_loader_that_ignores_the_sampler_is_caught():
    class OwnLoader(DigitsDataModule):
        def train_dataloader(self):
            return DataLoader(self.datasets["train"], batch_size=BATCH, shuffle=True, collate_fn=collate_batched)

    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining()])
    with pytest.raises(RuntimeError, match="does not draw with the HardExampleSampler"):
        trainer.fit(_model(), datamodule=OwnLoader(image_size=8, augment="none"))


def test_batches_out_of_the_sampler_order_are_caught_on_logging_steps():
    class Reversed(DigitsDataModule):  # a collate that reorders the batch: losses would go to the wrong examples
        def collate_fn(self, split):
            return lambda batch: tuple(part.flip(0) for part in collate_batched(batch))

    trainer = tiny_trainer(max_steps=3, log_every_n_steps=1, limit_val_batches=0, callbacks=[HardExampleMining()])
    with pytest.raises(RuntimeError, match=r"labels of training batch 0 are not those of the examples the sampler"):
        trainer.fit(_model(), datamodule=Reversed(image_size=8, batch_size=BATCH, augment="none"))
    unchecked = tiny_trainer(max_steps=3, log_every_n_steps=1, limit_val_batches=0,
                             callbacks=[HardExampleMining(check_labels=False)])
    unchecked.fit(_model(), datamodule=Reversed(image_size=8, batch_size=BATCH, augment="none"))


def test_two_mining_callbacks_are_rejected():
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `HardExampleMining`"):
        tiny_trainer(callbacks=[HardExampleMining(), HardExampleMining()])


def test_the_documented_yaml_runs_through_the_cli(tmp_path):
    import re
    from pathlib import Path

    from traincraft.cli import TraincraftCLI

    docs = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", docs, flags=re.S) if "HardExampleMining" in b]
    config = tmp_path / "hard.yaml"
    config.write_text(block + "model:\n  init_args: {model: mlp}\ndata:\n  init_args: {image_size: 8}\n")
    cli = TraincraftCLI(args=["fit", f"--config={config}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
                              "--trainer.limit_val_batches=1", "--trainer.logger=false",
                              "--trainer.enable_progress_bar=false"])
    (mining,) = [c for c in cli.trainer.callbacks if isinstance(c, HardExampleMining)]
    assert (mining.decay, mining.cap, mining.uniform_mix) == (0.9, 5.0, 0.2)
    assert 1.0 < float(cli.trainer.callback_metrics["hard_examples/max_ratio"]) <= 5.0


class _ManualClassifier(ImageClassifier):
    """An ImageClassifier trained under manual optimization (two optimizers, as a GAN-style module would have)."""

    def __init__(self, returns=True):
        super().__init__("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [8]})
        self.automatic_optimization = False
        self.returns = returns

    def configure_optimizers(self):
        params = list(self.parameters())
        return [torch.optim.SGD(params[:2], lr=0.05), torch.optim.SGD(params[2:], lr=0.05)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_example = F.cross_entropy(self(x), y, reduction="none")
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(per_example.mean())
        for opt in self.optimizers():
            opt.step()
        return {"per_example_loss": per_example.detach()} if self.returns else None


def test_manual_optimization_with_two_optimizers_records_the_returned_losses():
    seed_everything(0)
    mining = HardExampleMining()
    recorder = Recorder(mining)
    trainer = tiny_trainer(max_steps=8, limit_val_batches=0, log_every_n_steps=2, callbacks=[mining, recorder])
    trainer.fit(_ManualClassifier(), datamodule=_data())
    assert trainer.global_step == 8 and len(recorder.epochs[0]["losses"]) == 4  # two optimizer steps per batch
    indices = torch.cat(recorder.epochs[0]["indices"])
    losses = torch.cat(recorder.epochs[0]["losses"])
    assert int(mining.sampler.seen.sum()) == len(indices) == 4 * BATCH
    torch.testing.assert_close(mining.sampler.loss_ema[indices], losses)  # first losses start the averages


def test_manual_optimization_returning_none_is_told_what_to_return():
    mining = HardExampleMining()
    # Lightning turns a manual training_step's None into {}: refused on the first batch, never silently uniform
    with pytest.raises(TypeError, match=r"needs the loss of every example of the training batch, but training_step "
                                        r"returned a dict with keys \[\]\. Return a dict"):
        tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[mining]).fit(
            _ManualClassifier(returns=False), datamodule=_data())

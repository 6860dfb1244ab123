"""DataDriftMonitor end to end: its samples and statistics equal a manual computation (scipy's ks_2samp on features
recomputed by hand), it detects a documented shift and stays quiet without one, on images, plain vectors and the
token batches of Lightning's demo transformer LM; dict and tuple batches; fp32, bf16-mixed, gradient accumulation
and a two-optimizer GAN under manual optimization; no host-device synchronization in any training step. Bad
configurations and their messages are in tests/bad_inputs/test_drift.py."""

import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.loggers import CSVLogger, Logger
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks._drift_features import reduce_features
from traincraft.callbacks.data_drift import DataDriftMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.drift import ks_pvalues, ks_statistic, ks_test, mmd_test
from traincraft.modules import ImageClassifier


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: on a busy machine a second intra-op thread makes each forward ~50x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_samples_and_statistics_equal_a_manual_computation():
    monitor = DataDriftMonitor(max_samples=100, mmd="always", num_permutations=200, seed=3)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
    dm = DigitsDataModule(image_size=8, batch_size=32)
    trainer = tiny_trainer(max_steps=4, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0,
                           callbacks=[monitor])
    trainer.fit(clf, datamodule=dm)
    clf.eval()
    with torch.no_grad():  # reference: 100 evenly spaced training images, normalized, not augmented
        train = dm.datasets["train"]
        picks = torch.linspace(0, len(train) - 1, 100).round().long().tolist()
        images = torch.stack([train[i][0] for i in picks])
        reference = clf(dm.transform(images))
        val_images = torch.stack([dm.datasets["val"][i][0] for i in range(64)])  # 2 validation batches of 32
        current = clf(dm.transform(val_images))
    torch.testing.assert_close(monitor.reference_sample, reference)
    torch.testing.assert_close(monitor.current_sample, current)
    ks, mmd = ks_test(reference, current), mmd_test(reference, current, 200, seed=3)
    metrics = trainer.callback_metrics
    assert metrics["drift/ks_stat_max"].item() == pytest.approx(ks.statistic.max(), rel=1e-6)
    assert metrics["drift/ks_pvalue_min"].item() == pytest.approx(ks.adjusted_pvalue.min(), rel=1e-5)
    assert metrics["drift/mmd2"].item() == pytest.approx(mmd.statistic.item(), rel=1e-4)
    assert metrics["drift/mmd_pvalue"].item() == pytest.approx(mmd.pvalue.item())
    assert metrics["drift/n_reference"].item() == 100 and metrics["drift/n_current"].item() == 64


class Identity(pl.LightningModule):
    """Features are the inputs themselves; nothing trains (lr = 0), so only the data can drift."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.layer(x) + 0 * self.weight

    def training_step(self, batch, batch_idx):
        return self(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _drift_run(shift: float, mmd: str = "on_ks") -> DataDriftMonitor:
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(600, 4, generator=g), torch.randn(300, 4, generator=g)
    val[:, 1] += shift
    loader = functools.partial(DataLoader, batch_size=50)
    monitor = DataDriftMonitor(max_samples=300, mmd=mmd, num_permutations=500)
    trainer = tiny_trainer(max_steps=2, num_sanity_val_steps=0, callbacks=[monitor], val_check_interval=2)
    trainer.fit(Identity(), loader(TensorDataset(train)), loader(TensorDataset(val)))
    return monitor, trainer


def test_a_documented_shift_is_detected_and_no_shift_is_not():
    """Documented shift: one of 4 features moves by 0.5 standard deviations, 300 samples on each side."""
    quiet, trainer = _drift_run(0.0)
    assert not quiet.last["detected"] and quiet.last["mmd"] is None  # KS did not fire: MMD skipped
    assert "drift/mmd2" not in trainer.callback_metrics
    shifted, trainer = _drift_run(0.5)
    assert shifted.last["ks"].adjusted_pvalue.argmin() == 1
    assert shifted.last["detected"] and shifted.last["mmd"]["pvalue"] < 0.05
    assert trainer.callback_metrics["drift/detected"].item() == 1.0
    never, _ = _drift_run(0.5, mmd="never")
    assert never.last["detected"] and never.last["mmd"] is None


def test_a_fixed_reference_is_used_and_checkpointed():
    monitor = DataDriftMonitor(max_samples=50, mmd="never")
    reference = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)) + 3.0
    monitor.set_reference(reference)
    loader = DataLoader(TensorDataset(torch.randn(100, 4)), batch_size=25)
    tiny_trainer(max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[monitor]).fit(
        Identity(), loader, loader)
    torch.testing.assert_close(monitor.reference_sample, reference)
    assert monitor.last["detected"]
    fresh = DataDriftMonitor(max_samples=50, mmd="never")
    fresh.load_state_dict(monitor.state_dict())
    torch.testing.assert_close(fresh.state_dict()["reference"], reference)


def test_prediction_data_are_tested_against_training_data_and_logged():
    g = torch.Generator().manual_seed(2)
    train, shifted = torch.randn(400, 3, generator=g), torch.randn(200, 3, generator=g) + torch.tensor([0, 0, 1.0])
    monitor = DataDriftMonitor(max_samples=200, num_permutations=200)
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[monitor], logger=CSVLogger(".", name="p"))
    model = Identity()
    trainer.fit(model, DataLoader(TensorDataset(train), batch_size=50))
    trainer.predict(model, DataLoader(TensorDataset(shifted), batch_size=50))  # reference: the fit's training data
    picks = torch.linspace(0, 399, 200).round().long()
    torch.testing.assert_close(monitor.reference_sample, train[picks])
    torch.testing.assert_close(monitor.current_sample, shifted)
    assert monitor.last["detected"] and monitor.last["ks"].adjusted_pvalue.argmin() == 2
    trainer.loggers[0].save()
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("drift/predict/detected") == "1.0" for row in rows)


# --------------------------------------------------------------------------------- token data, the demo LM
V, T = 32, 12
_RANKS = torch.arange(1, V + 1, dtype=torch.float64)
ZIPF = (1 / _RANKS) / (1 / _RANKS).sum()  # training (and unshifted validation) unigram distribution
SHIFTED = ZIPF.roll(1)  # each id takes the frequency of the previous one: the most frequent token changes
HALF_SHIFTED = 0.5 * ZIPF + 0.5 * SHIFTED  # half of each token's mass moves to the next id


def token_set(probs: torch.Tensor, n: int, seed: int) -> TensorDataset:
    """``n`` sequences of ``T`` i.i.d. tokens, as (inputs, next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(probs.float(), n * (T + 1), replacement=True, generator=g).view(n, T + 1)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


class TokenLM(LightningTransformer):
    """Lightning's demo LM (``forward(inputs, target)``, log-probabilities flattened to ``(B·T, vocab)``), small."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(vocab_size=V)
        self.model = Transformer(vocab_size=V, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.0)
        self.lr = lr

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val/loss", nn.functional.nll_loss(self(inputs, target), target.reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def prepare_data(self) -> None:  # the demo's downloads WikiText-2: these tests bring their own tokens
        pass


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list = []

    name, version = "memory", "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def drift_rows(logger: MemoryLogger) -> list:
    return [(step, m) for step, m in logger.rows if "drift/ks_stat_max" in m]


def recomputed(module, dataset, indices, layer: nn.Module | None, reduce=torch.mean, bf16=False, call=None):
    """Features by hand: one forward over the chosen samples in evaluation mode, the layer's first output."""
    rows = []
    handle = layer.register_forward_hook(lambda m, a, out: rows.append(out) if not rows else None) if layer else None
    was = module.training
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = (call or module)(*dataset[torch.as_tensor(indices)])
    module.train(was)
    if handle is not None:
        handle.remove()
        out = rows[0]
    out = out.float()
    return reduce(out, 1) if out.ndim == 3 else out


def _fit_lm(train, val, layer="model.transformer.encoder", precision="32-true", lr=0.05, samples=64, **kwargs):
    monitor = DataDriftMonitor(layer=layer, forward="unpack", max_samples=samples, mmd="always",
                               num_permutations=200, **kwargs)
    logger = MemoryLogger()
    trainer = tiny_trainer(max_steps=4, val_check_interval=4, num_sanity_val_steps=0, callbacks=[monitor],
                           precision=precision, logger=logger)
    pl.seed_everything(0)
    lm = TokenLM(lr)
    trainer.fit(lm, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    return monitor, lm, logger


@pytest.mark.parametrize("layer", ["model.embedding", "model.transformer.encoder"])
def test_lm_token_drift_equals_scipy_on_features_recomputed_by_hand(layer):
    """Validation tokens from another unigram distribution: detected; statistics equal ks_2samp on the features."""
    train, val = token_set(ZIPF, 128, 0), token_set(SHIFTED, 64, 1)
    monitor, lm, logger = _fit_lm(train, val, layer)
    picks = torch.linspace(0, 127, 64).round().long()
    reference = recomputed(lm, train, picks, lm.get_submodule(layer))
    current = recomputed(lm, val, range(64), lm.get_submodule(layer))
    if layer == "model.embedding":  # its first call embeds the inputs (the second, the targets)
        torch.testing.assert_close(current, lm.model.embedding(val.tensors[0]).mean(1))
    torch.testing.assert_close(monitor.reference_sample, reference)
    torch.testing.assert_close(monitor.current_sample, current)
    ref, cur = reference.numpy(), current.numpy()
    scipy_ks = [stats.ks_2samp(ref[:, j], cur[:, j], method="exact") for j in range(ref.shape[1])]
    ((step, row),) = drift_rows(logger)
    assert row["drift/ks_stat_max"] == pytest.approx(max(r.statistic for r in scipy_ks), abs=1e-7)
    assert row["drift/ks_pvalue_min"] == pytest.approx(min(1.0, 8 * min(r.pvalue for r in scipy_ks)), rel=1e-6)
    assert monitor.last["detected"] and row["drift/detected"] == 1.0 and row["drift/mmd_pvalue"] < 0.05
    # Lightning's step for validation metrics (val/loss logged in the same row): batches that stepped before the
    # 4th batch, whose end runs the validation
    assert step == 3 and "val/loss" in row


def test_lm_without_shift_is_quiet():
    monitor, _, _ = _fit_lm(token_set(ZIPF, 128, 0), token_set(ZIPF, 64, 1))
    assert not monitor.last["detected"] and monitor.last["ks"].adjusted_pvalue.min() > 0.05


def test_token_features_false_positive_rate_is_alpha_and_power_is_high():
    """The statistical functions on the features the monitor computes with layer='model.embedding' (equal to
    embedding(inputs).mean(1), checked above): 400 trials of 100 vs 100 sequences of 12 tokens, 8 features.
    No shift: KS + Bonferroni rejects in [2%, 8%] of trials at alpha = 5%, MMD (200 trials of 50 vs 50) too.
    Validation tokens from HALF_SHIFTED: power >= 0.95 (KS) and >= 0.9 (MMD)."""
    embedding = TokenLM().model.embedding
    g = torch.Generator().manual_seed(1)
    trials, n, d = 400, 100, 8

    def features(probs):
        ids = torch.multinomial(probs.float(), trials * n * T, replacement=True, generator=g).view(trials * n, T)
        with torch.no_grad():
            return embedding(ids).mean(1).view(trials, n, d)

    reference, same, shifted = features(ZIPF), features(ZIPF), features(HALF_SHIFTED)

    def ks_rejections(x, y):
        columns = [t.permute(1, 0, 2).reshape(n, trials * d) for t in (x, y)]  # every trial's features side by side
        p = ks_pvalues(ks_statistic(*columns), n, n, "exact").reshape(trials, d)
        return float((np.minimum(p * d, 1.0).min(1) < 0.05).mean())

    fpr, power = ks_rejections(reference, same), ks_rejections(reference, shifted)
    assert 0.02 <= fpr <= 0.08 and power >= 0.95, (fpr, power)
    mmd_null = np.mean([bool(mmd_test(reference[i, :50], same[i, :50], 200, seed=i).pvalue < 0.05)
                        for i in range(200)])
    mmd_power = np.mean([bool(mmd_test(reference[i, :50], shifted[i, :50], 200, seed=i).pvalue < 0.05)
                         for i in range(200)])
    assert 0.02 <= mmd_null <= 0.08 and mmd_power >= 0.9, (mmd_null, mmd_power)


def test_bf16_mixed_gives_the_fp32_result_and_rounding_is_not_drift():
    """Same weights (lr = 0): the decision under bf16-mixed equals fp32's, the statistic within one ECDF step.
    Validation data identical to the training data: both samples go through the same precision, so the KS
    statistic is exactly 0 (a float32 reference against bf16 current features would differ)."""
    train = token_set(ZIPF, 64, 0)
    for val in (token_set(ZIPF, 64, 1), token_set(SHIFTED, 64, 1)):
        fp32, _, _ = _fit_lm(train, val, lr=0.0)
        bf16, lm, _ = _fit_lm(train, val, precision="bf16-mixed", lr=0.0)
        assert bf16.last["detected"] == fp32.last["detected"]
        # within one step of the ECDFs (1/64); measured: equal
        assert abs(bf16.last["ks"].statistic.max() - fp32.last["ks"].statistic.max()) <= 1 / 64 + 1e-12
        torch.testing.assert_close(bf16.current_sample, recomputed(lm, val, range(64), lm.model.transformer.encoder,
                                                                   bf16=True))
    same, _, _ = _fit_lm(train, train, precision="bf16-mixed", lr=0.0)
    assert same.last["ks"].statistic.max() == 0.0 and not same.last["detected"]


# --------------------------------------------------------------------------------- GAN, accumulation, syncs
class GAN(pl.LightningModule):
    """Two SGD optimizers under manual optimization: global_step moves by 2 per batch. forward = discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.discriminator(x)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(len(real), 4))
        logits = self(torch.cat([real, fake.detach()]))
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
        d_opt.zero_grad()
        self.manual_backward(nn.functional.binary_cross_entropy_with_logits(logits, labels))
        d_opt.step()
        logits = self(self.generator(torch.randn(len(real), 4)))
        g_opt.zero_grad()
        self.manual_backward(nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)))
        g_opt.step()

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.SGD(self.discriminator.parameters(), lr=0.1)]


class Regressor(pl.LightningModule):
    """Automatic optimization, one Linear+ReLU layer: for accumulation and bf16-mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[0][:, :1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("setting", ["gan", "accumulate", "bf16-mixed"])
def test_manual_optimization_accumulation_and_bf16_test_the_final_model_and_log_at_lightnings_step(setting):
    g = torch.Generator().manual_seed(5)
    train, val = torch.randn(64, 6, generator=g), torch.randn(48, 6, generator=g) + torch.tensor([0.8] + [0.0] * 5)
    module = GAN() if setting == "gan" else Regressor()
    monitor = DataDriftMonitor(max_samples=48, mmd="always", num_permutations=100,
                               layer=None if setting == "gan" else "body")
    logger = MemoryLogger()
    accumulate = 2 if setting == "accumulate" else 1
    trainer = tiny_trainer(max_steps=8 if setting == "gan" else 4, val_check_interval=4 * accumulate,
                           num_sanity_val_steps=0, callbacks=[monitor], logger=logger,
                           accumulate_grad_batches=accumulate,
                           precision="bf16-mixed" if setting == "bf16-mixed" else "32-true")
    trainer.fit(module, DataLoader(TensorDataset(train), batch_size=8), DataLoader(TensorDataset(val), batch_size=8))
    layer = None if setting == "gan" else module.body
    reference = recomputed(module, TensorDataset(train), torch.linspace(0, 63, 48).round().long(), layer,
                           bf16=setting == "bf16-mixed")
    current = recomputed(module, TensorDataset(val), range(48), layer, bf16=setting == "bf16-mixed")
    torch.testing.assert_close(monitor.reference_sample, reference)
    torch.testing.assert_close(monitor.current_sample, current)
    ((step, row),) = drift_rows(logger)
    ref, cur = reference.numpy(), current.numpy()
    ks = max(stats.ks_2samp(ref[:, j], cur[:, j]).statistic for j in range(ref.shape[1]))
    assert row["drift/ks_stat_max"] == pytest.approx(ks, abs=1e-7)
    # Lightning's step for validation metrics, batches that stepped before the last one: 3, whereas a GAN's
    # global_step is 8 and accumulation's 8 batches stepped 4 times
    assert step == 3
    assert trainer.global_step == (8 if setting == "gan" else 4)


def test_no_training_step_synchronizes_with_the_host():
    window = SyncWindow()
    monitor = DataDriftMonitor(layer="body", max_samples=32, num_permutations=100)
    data = TensorDataset(torch.randn(64, 6))
    trainer = tiny_trainer(max_steps=6, val_check_interval=3, num_sanity_val_steps=0, callbacks=[window, monitor])
    with count_host_syncs(window.current, window.enabled):
        trainer.fit(Regressor(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert len(window.counts) == 6 and all(not calls for calls in window.counts.values()), window.counts
    assert monitor.last["n_current"] == 32  # the test ran (twice), outside the training steps


# --------------------------------------------------------------------------------- batch structures
class DictModel(pl.LightningModule):
    """Batches ``{"label": (B,), "pixels": (B, 6)}``; forward(pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, pixels, label=None):
        return self.net(pixels)

    def training_step(self, batch, batch_idx):
        return self(batch["pixels"]).square().mean()

    def validation_step(self, batch, batch_idx):
        self(batch["pixels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, as_dict: bool) -> None:
        self.x, self.as_dict = x, as_dict

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        label = torch.tensor(i % 3)
        return {"label": label, "pixels": self.x[i]} if self.as_dict else (label, self.x[i])


def pixel_energy(batch) -> torch.Tensor:
    """A function of the batch, importable by name (for the YAML form of features=)."""
    pixels = batch["pixels"] if isinstance(batch, dict) else batch[1]
    return pixels.square()


class TupleModel(DictModel):
    def training_step(self, batch, batch_idx):
        return self(batch[1]).square().mean()

    def validation_step(self, batch, batch_idx):
        self(batch[1])


@pytest.mark.parametrize("case", ["dict input_key", "dict unpack", "tuple index", "callable", "dotted path"])
def test_dict_and_tuple_batches(case):
    g = torch.Generator().manual_seed(9)
    train, val = torch.randn(40, 6, generator=g), torch.randn(24, 6, generator=g) + 1.5
    as_dict = case in ("dict input_key", "dict unpack", "dotted path")
    kwargs = {"dict input_key": dict(input_key="pixels"), "dict unpack": dict(forward="unpack"),
              "tuple index": dict(input_key=1), "callable": dict(features=pixel_energy),
              "dotted path": dict(features="tests.callbacks.test_data_drift.pixel_energy")}[case]
    monitor = DataDriftMonitor(max_samples=24, mmd="never", **kwargs)
    module = DictModel() if as_dict else TupleModel()
    trainer = tiny_trainer(max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[monitor])
    trainer.fit(module, DataLoader(Pairs(train, as_dict), batch_size=8), DataLoader(Pairs(val, as_dict), batch_size=8))
    picks = torch.linspace(0, 39, 24).round().long()
    function = "features" in kwargs
    with torch.no_grad():
        reference, current = (train[picks], val[:24]) if function else (module(train[picks]), module(val[:24]))
    if function:
        reference, current = reference.square(), current.square()
    torch.testing.assert_close(monitor.reference_sample, reference)
    torch.testing.assert_close(monitor.current_sample, current)
    assert monitor.last["detected"]  # validation pixels are shifted by 1.5 standard deviations


def test_sequence_reductions():
    x = torch.arange(2 * 3 * 4, dtype=torch.bfloat16).view(2, 3, 4)
    torch.testing.assert_close(reduce_features(x, "mean"), x.float().mean(1))
    torch.testing.assert_close(reduce_features(x, "last"), x.float()[:, -1])
    torch.testing.assert_close(reduce_features(x, "flatten"), x.float().reshape(2, 12))
    images = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(reduce_features(images, "mean"), images.mean((2, 3)))
    assert reduce_features(torch.ones(5), "mean").shape == (5, 1)
    assert reduce_features(x, "mean").dtype == torch.float32


class Noisy(pl.LightningModule):
    """Dropout, BatchNorm and noise drawn in forward: anything an extra forward pass could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_monitor_leaves_training_unchanged():
    """The first batch's check and the validations run forward passes; weights, BatchNorm statistics and the random
    stream after the fit are bit-identical to a fit without the monitor."""
    data = TensorDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(3)))
    states = []
    for callbacks in ([], [DataDriftMonitor(max_samples=16, num_permutations=50)]):
        pl.seed_everything(7)
        module = Noisy()
        trainer = tiny_trainer(max_steps=6, val_check_interval=3, num_sanity_val_steps=0, callbacks=callbacks)
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        states.append((module.state_dict(), torch.rand(3), module.training))
    (plain, rand_plain, mode_plain), (monitored, rand_monitored, mode_monitored) = states
    assert plain.keys() == monitored.keys() and all(torch.equal(plain[k], monitored[k]) for k in plain)
    assert torch.equal(rand_plain, rand_monitored) and mode_plain == mode_monitored


def test_an_rnn_layer_gives_its_output_sequence_reduced_over_time():
    lstm = nn.LSTM(3, 4, batch_first=True)
    module = nn.Sequential()
    module.add_module("rnn", lstm)
    x = torch.randn(5, 7, 3)
    trainer = tiny_trainer()
    for reduce, expected in (("mean", lambda out: out.mean(1)), ("last", lambda out: out[:, -1]),
                             ("flatten", lambda out: out.reshape(5, 28))):
        monitor = DataDriftMonitor(layer="rnn", reduce=reduce)
        with torch.no_grad():
            torch.testing.assert_close(monitor.features_of(trainer, module, (x, None)), expected(lstm(x)[0]))


def test_features_wider_than_the_sample_are_warned_about_on_the_first_batch():
    monitor = DataDriftMonitor(layer="model.decoder", forward="unpack", reduce="flatten", max_samples=16, mmd="never")
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"the output of layer 'model\.decoder' gives 384 features per sample, more "
                                         r"than the 16 samples per side\. .* A narrower layer"):
        trainer.fit(TokenLM(), DataLoader(token_set(ZIPF, 16, 0), batch_size=8))

"""CovariateShiftMonitor: statistics equal numpy on the recorded layer inputs, BatchNorm comparison on a hand-made
case, hooks only on logging steps with one host copy per log, histograms and images to TensorBoard."""

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from tests.helpers import count_host_syncs, tiny_trainer
from traincraft._steps import is_logging_step
from traincraft.callbacks._covariate_probe import LayerProbe
from traincraft.callbacks.covariate_shift import CovariateShiftMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class Recorder(Callback):
    """Records, with hooks of its own, the inputs (first ``rows`` samples) and BatchNorm running statistics that
    the monitor reads: on training logging steps, and in the first validation batches."""

    def __init__(self, names, rows, eval_batches):
        self.names, self.rows, self.eval_batches = names, rows, eval_batches
        self.train: list[dict] = []
        self.val: dict[str, list] = {}
        self._on, self._step, self._val_batch = False, {}, 0

    def on_fit_start(self, trainer, pl_module):
        for name, module in pl_module.named_modules():
            if name in self.names:
                module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args):
            if self._on == "train":
                entry = {"x": args[0][: self.rows].detach().double().clone()}
                if isinstance(module, nn.BatchNorm2d):
                    entry.update(full=args[0].detach().double().clone(), rm=module.running_mean.double().clone(),
                                 rv=module.running_var.double().clone(), eps=module.eps)
                self._step[name] = entry
            elif self._on == "val" and self._val_batch < self.eval_batches:
                self.val.setdefault(name, []).append(args[0][: self.rows].detach().double().clone())

        return hook

    def on_train_batch_start(self, trainer, *args):
        self._on, self._step = ("train" if is_logging_step(trainer) else False), {}

    def on_train_batch_end(self, trainer, *args):
        if self._on == "train":
            self.train.append(self._step)
        self._on = False

    def on_validation_epoch_start(self, trainer, pl_module):
        self._on, self._val_batch, self.val = ("val" if not trainer.sanity_checking else False), 0, {}

    def on_validation_batch_end(self, *args):
        self._val_batch += 1


def _channels(x: torch.Tensor) -> np.ndarray:
    x = x.numpy()
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def _strided(v, size):
    return v[:, :: math.ceil(v.shape[1] / size)]


def _check_stats(stats, batches, kind, percentile_samples):
    """Statistics of the concatenated ``batches`` (each ``(C, values)``); percentiles on each batch's strided
    subsample, pooled and strided again to ``percentile_samples``."""
    v = np.concatenate(batches, axis=1)
    np.testing.assert_allclose(stats["mean"], v.mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["std"], v.std(1), rtol=1e-4, atol=1e-5)
    sub = _strided(np.concatenate([_strided(b, percentile_samples) for b in batches], axis=1), percentile_samples)
    for label, q in (("p15", 15), ("p50", 50), ("p85", 85)):
        np.testing.assert_allclose(stats[label], np.percentile(sub, q, axis=1), rtol=1e-4, atol=1e-5)
    if kind == "relu":
        np.testing.assert_allclose(stats["dead_frac"], (np.maximum(v, 0) == 0).mean(1), atol=1e-6)
    if kind == "sigmoid":
        y = 1 / (1 + np.exp(-v))
        np.testing.assert_allclose(stats["sat_frac"], ((y < 0.03) | (y > 0.97)).mean(1), atol=1e-6)
    if kind == "tanh":
        np.testing.assert_allclose(stats["sat_frac"], (np.abs(np.tanh(v)) > 0.97).mean(1), atol=1e-6)


@pytest.mark.parametrize(
    "model_kwargs",
    [{"model": "convnet", "norm": "batch", "activation": "relu"}, {"model": "mlp", "norm": "none", "activation": "sigmoid"}],
    ids=["convnet-bn-relu", "mlp-sigmoid"],
)
def test_statistics_equal_numpy_on_the_recorded_layer_inputs(model_kwargs):
    kwargs = dict(model_kwargs)
    name = kwargs.pop("model")
    extra = {"channels": [4, 8], "hidden": 16} if name == "convnet" else {"hidden": [24, 12]}
    clf = ImageClassifier(name, num_classes=10, in_channels=1, input_size=8, model_kwargs={**kwargs, **extra})
    monitor = CovariateShiftMonitor(max_rows=20, percentile_samples=100, eval_batches=2)
    names = [probe_name for probe_name, m in clf.named_modules()
             if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.BatchNorm2d))]
    recorder = Recorder(names, rows=20, eval_batches=2)
    trainer = tiny_trainer(max_steps=6, log_every_n_steps=3, val_check_interval=6, limit_val_batches=3,
                           num_sanity_val_steps=0, callbacks=[monitor, recorder])
    trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    assert sorted(p.name for p in monitor.probes) == sorted(names)  # default selection: activations and norms
    assert len(recorder.train) == 2  # logging steps 3 and 6
    last, before = recorder.train[-1], recorder.train[0]
    for layer in names:
        module = clf.get_submodule(layer)
        kind = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}.get(type(module), "norm")
        stats = {k: v.numpy() for k, v in monitor.latest["train"][layer].items()}
        v = _channels(last[layer]["x"])
        _check_stats(stats, [v], kind, 100)
        # the drift between the two logs: normalized 2-Wasserstein between per-channel Gaussians
        u = _channels(before[layer]["x"])
        w2 = np.sqrt((u.mean(1) - v.mean(1)) ** 2 + (u.std(1) - v.std(1)) ** 2) / np.sqrt((u.var(1) + v.var(1)) / 2)
        np.testing.assert_allclose(stats["w2_drift"], w2, rtol=1e-3, atol=1e-5)
        if kind == "norm":  # BatchNorm: statistics of the whole batch against the running ones before the update
            full, rm, rv = _channels(last[layer]["full"]), last[layer]["rm"].numpy(), last[layer]["rv"].numpy()
            np.testing.assert_allclose(stats["bn_mean_gap"], np.abs(full.mean(1) - rm) / np.sqrt(rv + 1e-5),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats["bn_var_ratio"], full.var(1, ddof=1) / (rv + 1e-5), rtol=1e-4)
        # validation: the first 2 batches pooled, kept apart from the training statistics
        val = {k: v.numpy() for k, v in monitor.latest["val"][layer].items()}
        assert len(recorder.val[layer]) == 2
        _check_stats(val, [_channels(x) for x in recorder.val[layer]], kind, 100)
        assert "w2_drift" not in val  # the first validation has nothing to compare with


def test_batchnorm_comparison_on_a_hand_made_case():
    bn = nn.BatchNorm1d(2)
    bn.running_mean.copy_(torch.tensor([1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    r = math.sqrt(2.0)  # two samples at c ± √2: unbiased variance 4
    x = torch.tensor([[3 - r, 2 - r], [3 + r, 2 + r]])
    for mode in (bn.eval, bn.train):  # in training mode the hook must read the running statistics before the update
        mode()
        probe = LayerProbe("bn", bn, max_rows=8, percentile_samples=8)
        probe.attach()
        bn(x)
        probe.detach()
        result = probe.result()
        eps = bn.eps  # the running variance is used as BatchNorm uses it, with eps
        torch.testing.assert_close(result["bn_mean_gap"], torch.tensor([2.0 / math.sqrt(4.0 + eps), 0.0]))
        torch.testing.assert_close(result["bn_var_ratio"], torch.tensor([4.0 / (4.0 + eps), 4.0 / (1.0 + eps)]))


def _sync_counts(with_monitor: bool) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    current: dict[str, int] = {}
    enabled = [False]

    class Open(Callback):
        def on_train_batch_start(self, trainer, *args):
            current.clear()
            enabled[0] = True

    class Close(Callback):
        def on_train_batch_end(self, trainer, *args):
            enabled[0] = False
            counts[trainer.global_step] = dict(current)

    clf = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                          model_kwargs={"channels": [4, 8], "hidden": 16})
    # callbacks run in list order: the window opens before the monitor's hooks and closes after them
    callbacks = [Open(), CovariateShiftMonitor(), Close()] if with_monitor else [Open(), Close()]
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, limit_val_batches=0, callbacks=callbacks,
                           logger=CSVLogger(".", name="sync"))
    with count_host_syncs(current, enabled):
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    return counts


def test_no_host_sync_on_non_logging_steps_and_one_copy_per_log():
    plain, monitored = _sync_counts(False), _sync_counts(True)
    assert len(monitored) == 8
    # the monitor adds nothing on other steps (the classifier checks its labels once, on the first batch)
    quiet = {step: c for step, c in monitored.items() if step % 4 != 0 and c != plain[step]}
    assert not quiet, quiet
    for step in (4, 8):  # the monitor adds exactly one copy to the host per logging step
        extra = {k: monitored[step].get(k, 0) - plain[step].get(k, 0) for k in set(monitored[step]) | set(plain[step])}
        # one device-to-host copy, then a zero-copy numpy view of it
        assert {k: v for k, v in extra.items() if v} == {"cpu": 1, "numpy": 1}, (monitored[step], plain[step])


def test_histograms_and_the_histogram_image_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
    monitor = CovariateShiftMonitor(layers=["model.blocks.0.act"], image_every_n_logs=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = tiny_trainer(max_steps=4, log_every_n_steps=1, limit_val_batches=0, callbacks=[monitor], logger=logger)
    trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    tags = events.Tags()
    layer = "model.blocks.0.act"
    assert len(events.Histograms(f"covshift/train/{layer}/hist")) == 4
    images = events.Images(f"covshift/train/{layer}/hist_over_time")
    assert [im.step for im in images] == [1, 3]  # after logs 2 and 4
    assert {f"covshift/train/{layer}/{k}" for k in ("mean", "std", "p15", "p50", "p85", "dead_frac", "w2_drift")} <= set(
        tags["scalars"]
    )


def test_layer_selection_by_type_and_glob_and_errors():
    clf = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                          model_kwargs={"channels": [4, 8], "hidden": 16})
    from traincraft.callbacks._covariate_probe import select_layers

    assert [n for n, _ in select_layers(clf, ["BatchNorm2d"])] == [
        "model.blocks.0.norm1", "model.blocks.0.norm2", "model.blocks.1.norm1", "model.blocks.1.norm2"]
    assert [n for n, _ in select_layers(clf, ["model.blocks.*.act2", "model.fc.act"])] == [
        "model.blocks.0.act2", "model.blocks.1.act2", "model.fc.act"]
    with pytest.raises(ValueError, match=r"match no module .* type names .*'ReLU'"):
        select_layers(clf, ["Softplus"])
    with pytest.raises(ValueError, match="non-empty list"):
        CovariateShiftMonitor(layers="ReLU")
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1; got 0"):
        CovariateShiftMonitor(max_rows=0)


def test_drift_reference_survives_a_checkpoint():
    monitor = CovariateShiftMonitor(layers=["ReLU"])
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [8]})
    tiny_trainer(max_steps=2, log_every_n_steps=2, limit_val_batches=0, callbacks=[monitor]).fit(
        clf, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    state = monitor.state_dict()
    torch.testing.assert_close(state["previous"]["train"]["model.blocks.0.act"]["mean"],
                               monitor.latest["train"]["model.blocks.0.act"]["mean"])
    fresh = CovariateShiftMonitor(layers=["ReLU"])
    fresh.load_state_dict(state)
    assert fresh.state_dict()["logs"] == 1 and fresh.state_key == monitor.state_key


def _probe_stats(module, x, axis="auto", sequence=False):
    probe = LayerProbe("layer", module, max_rows=128, percentile_samples=1000, axis=axis, sequence=sequence)
    probe.attach()
    module(x)
    probe.detach()
    return {k: v.double().numpy() for k, v in probe.result().items() if k in ("mean", "std", "dead_frac")}


@pytest.mark.parametrize(("module", "shape", "sequence", "axis", "features"), [
    (nn.ReLU(), (6, 5, 4), True, "auto", -1),  # (N, T, E) in a sequence model: per embedding feature
    (nn.ReLU(), (6, 5, 4), False, "auto", 1),  # (N, C, L) of a Conv1d model: per channel
    (nn.ReLU(), (6, 5, 4), True, "channels", 1),  # forced
    (nn.ReLU(), (6, 3, 4, 4), True, "auto", 1),  # images stay per channel, also in a model with embeddings
    (nn.LayerNorm(4), (6, 5, 4), False, "auto", -1),  # LayerNorm normalizes the last dimension
    (nn.BatchNorm1d(5), (6, 5, 4), True, "auto", 1),  # BatchNorm normalizes per channel
    (nn.ReLU(), (6, 5, 4), False, "last", -1),  # forced
])
def test_the_feature_axis_of_each_layer_is_kept_and_every_other_axis_reduced(module, shape, sequence, axis,
                                                                             features):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    stats = _probe_stats(module, x, axis, sequence)
    v = np.moveaxis(x.double().numpy(), features, 0).reshape(shape[features], -1)
    np.testing.assert_allclose(stats["mean"], v.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], v.std(1), rtol=1e-5, atol=1e-6)
    if isinstance(module, nn.ReLU):
        np.testing.assert_allclose(stats["dead_frac"], (v <= 0).mean(1), atol=1e-7)


def test_a_transformer_is_a_sequence_model_and_its_layer_norms_are_per_embedding_feature():
    from tests.compat.zoo import TinyLM

    lm = TinyLM()
    monitor = CovariateShiftMonitor(eval_batches=0, log_histograms=False)
    monitor.setup(None, lm, "fit")
    assert {type(p.module).__name__ for p in monitor.probes} == {"LayerNorm"}  # its ReLUs are functional
    assert all(p.sequence for p in monitor.probes)
    probe = next(p for p in monitor.probes if p.name == "model.transformer.encoder.layers.0.norm1")
    inputs, target = next(iter(lm.train_dataloader()))
    probe.attach()
    lm(inputs, target)
    probe.detach()
    assert probe.result()["mean"].shape == (4,)  # ninp features, not the 6 tokens


def test_a_compiled_model_is_measured_even_after_graphs_were_compiled_without_the_hooks():
    """Dynamo reuses a graph traced without hooks (also one of another instance of the same classes) and never
    calls hooks added later: the monitor keeps its hooks from setup on, makes dynamo guard on them and drops such
    graphs, so the statistics still equal those a forward pre-hook of the test recorded."""
    from tests.compat._cells import run
    from tests.compat.checks import check_covariate_shift

    run("mlp", "compile", [], record=False)  # graphs of the same classes, traced without any hook
    check_covariate_shift(run("mlp", "compile", ["CovariateShiftMonitor"]))

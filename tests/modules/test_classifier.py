import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.data import DigitsDataModule
from traincraft.models import MLP
from traincraft.modules import ImageClassifier

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.05),
    "momentum": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "nesterov": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": functools.partial(torch.optim.Adagrad, lr=0.05),
    "adadelta": functools.partial(torch.optim.Adadelta, lr=1.0),
    "rmsprop": functools.partial(torch.optim.RMSprop, lr=1e-3),
    "adam": functools.partial(torch.optim.Adam, lr=1e-3),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-3),
}


def _digits(**kwargs):
    kwargs.setdefault("image_size", 8)
    kwargs.setdefault("augment", "none")
    return DigitsDataModule(**kwargs)


def _mlp_classifier(**kwargs):
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, **kwargs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_classic_optimizer_trains(name):
    clf = _mlp_classifier(optimizer=OPTIMIZERS[name])
    dm = _digits(batch_size=64)
    trainer = tiny_trainer(max_epochs=2, num_sanity_val_steps=0)
    before = trainer.validate(clf, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(clf, datamodule=dm)
    after = trainer.validate(clf, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before, f"{name}: val loss {before:.3f} -> {after:.3f}"


def test_logged_metrics_equal_a_reference_computation():
    clf = _mlp_classifier()
    dm = _digits(batch_size=64, eval_batch_size=50)
    trainer = tiny_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(clf, datamodule=dm)
    logged = trainer.validate(clf, datamodule=dm, verbose=False)[0]
    clf.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            x, y = dm.on_after_batch_transfer(batch, 0)
            logits.append(clf(x))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    assert logged["val/acc"] == pytest.approx(top1, abs=1e-6)
    assert logged["val/acc_top5"] == pytest.approx(top5, abs=1e-6)
    assert logged["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_top5_only_with_more_than_five_classes():
    clf = ImageClassifier("mlp", num_classes=4, in_channels=1, input_size=8)
    assert not any("top5" in k for k in clf.metrics)
    assert "val_acc_top5" in _mlp_classifier().metrics


def test_label_smoothing_enters_the_loss():
    clf = _mlp_classifier(label_smoothing=0.2)
    logits, y = torch.randn(6, 10), torch.arange(6)
    assert clf.compute_loss(logits, y) == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item())


def test_per_layer_learning_rates_are_named_groups_that_schedulers_scale():
    clf = _mlp_classifier(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_multipliers={"blocks.0.*": 3.0, "head.*": 0.5},
    )
    config = clf.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == pytest.approx({"default": 0.1, "blocks.0.*": 0.3, "head.*": 0.05})
    names = {n for n, p in clf.model.named_parameters() if any(p is q for q in groups["head.*"]["params"])}
    assert names == {n for n, _ in clf.model.named_parameters() if n.startswith("head.")}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(clf.model.parameters()))

    # through a Trainer: Lightning's LearningRateMonitor sees the named groups, the scheduler halves each rate
    logger = CSVLogger(".", name="lr")
    trainer = tiny_trainer(max_epochs=2, logger=logger, callbacks=[LearningRateMonitor("epoch")], limit_val_batches=0)
    trainer.fit(clf, datamodule=_digits())
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs == pytest.approx({"default": 0.025, "blocks.0.*": 0.075, "head.*": 0.0125})
    with open(f"{logger.log_dir}/metrics.csv") as f:
        assert "lr-SGD/head.*" in f.readline()


def test_lr_multiplier_patterns_that_match_nothing_are_rejected():
    with pytest.raises(ValueError, match=r"match no trainable parameter.*blocks\.0\.linear\.weight"):
        _mlp_classifier(lr_multipliers={"features.conv1.*": 2.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        _mlp_classifier(lr_multipliers={"head.*": -1.0})


def test_model_objects_and_dotted_paths_work():
    net = MLP(num_classes=10, in_channels=1, input_size=8)
    clf = ImageClassifier(net)
    assert clf.model is net and "model" not in clf.hparams
    by_path = ImageClassifier("traincraft.models.MLP", num_classes=10, in_channels=1, input_size=8)
    assert isinstance(by_path.model, MLP)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(clf, datamodule=_digits())  # num_classes taken from the data
    assert clf.num_classes == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "resnet9000", "num_classes": 10}, ValueError, "registered models are alexnet"),
        ({"model": "mlp"}, ValueError, "num_classes is required"),
        ({"model": "mlp", "num_classes": 1}, ValueError, "num_classes must be an integer >= 2"),
        ({"model": "mlp", "num_classes": 10, "label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"model": "mlp", "num_classes": 10, "optimizer": "sgd"}, TypeError, "optimizer must be a callable"),
        ({"model": "mlp", "num_classes": 10, "model_kwargs": {"num_classes": 3}}, ValueError, "not in model_kwargs"),
        ({"model": 3}, TypeError, "model must be a model name"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ImageClassifier(**kwargs)


def test_num_classes_that_does_not_match_the_data_is_rejected():
    clf = ImageClassifier("mlp", num_classes=7, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match="num_classes=7 but DigitsDataModule has 10 classes"):
        tiny_trainer(max_steps=1).fit(clf, datamodule=_digits())


def test_wrong_image_shape_names_the_fix():
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=16)
    with pytest.raises(ValueError, match="16"):
        tiny_trainer(max_steps=1).fit(clf, datamodule=_digits(image_size=8))


def test_a_checkpoint_of_a_different_model_is_rejected(tmp_path):
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(_mlp_classifier(), datamodule=_digits())
    path = tmp_path / "mlp.ckpt"
    trainer.save_checkpoint(path)
    other = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"different model.*'model': 'mlp'.*missing keys"):
        tiny_trainer(max_steps=2).fit(other, datamodule=_digits(), ckpt_path=path)
    # and the matching model loads with weights_only
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True)
    assert isinstance(restored.model, MLP)


def test_non_finite_loss_stops_training_on_a_logging_step():
    class Exploding(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"), requires_grad=True)

    clf = ImageClassifier(Exploding(), num_classes=10, optimizer=lambda p: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(FloatingPointError, match=r"optimizer step 0 .*training loss was nan.*GradientClipping"):
        tiny_trainer(max_steps=5, log_every_n_steps=1).fit(clf, datamodule=_digits())


def test_no_host_sync_on_non_logging_steps():
    """Augmentation, normalization, forward, loss, metrics, backward and the step: no copy to the host."""
    dm = DigitsDataModule(image_size=16)  # default augmentation on
    window = SyncWindow(datamodule=dm)
    counts = window.counts
    clf = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16,
                          scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1))
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, callbacks=[window], limit_val_batches=0,
                           logger=CSVLogger(".", name="sync"))
    with count_host_syncs(window.current, window.enabled):
        trainer.fit(clf, datamodule=dm)
    assert len(counts) == 8
    # global_step counts completed optimizer steps: steps 4 and 8 are the logging steps
    quiet = {step: c for step, c in counts.items() if step % 4 != 0}
    assert quiet and all(not c for c in quiet.values()), quiet

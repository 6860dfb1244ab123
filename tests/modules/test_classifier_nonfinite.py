"""ImageClassifier's non-finite guard: a bad step between logging steps never reaches the weights, is named at the
next check, and costs no host synchronization; labels out of range or of the wrong type are refused."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos import Transformer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.callbacks import GradientClipping
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

SGD_MOMENTUM = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)
ADAMW_FUSED = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)


class InjectInf(Callback):
    """Makes one gradient entry infinite at optimizer step ``step``: before the module's check, or with
    ``after_backward=True`` right after backward (before an fp16 GradScaler unscales and looks)."""

    def __init__(self, step: int = 5, value: float = float("inf"), after_backward: bool = False) -> None:
        self.step, self.value, self.after_backward = step, value, after_backward

    def _inject(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = self.value

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.after_backward:
            self._inject(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.after_backward:
            self._inject(trainer, pl_module)


class DropStep(Callback):
    """The reference: the batches of optimizer step ``step`` leave no trace. The step sees no gradients (torch's
    optimizers then leave parameters and state untouched) and the buffers (BatchNorm statistics) are put back as
    they were before the step's first micro-batch (``accumulate`` batches per step)."""

    def __init__(self, step: int = 5, accumulate: int = 1, buffers: bool = True) -> None:
        self.step, self.accumulate, self.buffers, self.saved = step, accumulate, buffers, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.buffers and batch_idx == self.step * self.accumulate:
            self.saved = [b.clone() for b in pl_module.buffers()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad = None
            for live, saved in zip(pl_module.buffers(), self.saved or [], strict=False):
                live.copy_(saved)


class EditBatch(Callback):
    """Changes the training batch ``batch`` in place: NaN images or a label."""

    def __init__(self, batch: int, image: float | None = None, label: int | None = None) -> None:
        self.batch, self.image, self.label = batch, image, label

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            if self.image is not None:
                batch[0][0].fill_(self.image)
            if self.label is not None:
                batch[1][0] = self.label


def _digits(**kwargs):
    return DigitsDataModule(image_size=8, augment="none", batch_size=32, **kwargs)


def _fit(callbacks, optimizer=SGD_MOMENTUM, policy="raise", steps=10, log_every=50, error=None, **trainer_kwargs):
    seed_everything(0)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, optimizer=optimizer,
                          on_nonfinite=policy)
    trainer = tiny_trainer(max_steps=steps, log_every_n_steps=log_every, limit_val_batches=0, callbacks=callbacks,
                           **trainer_kwargs)
    if error is None:
        trainer.fit(clf, datamodule=_digits())
        return clf, trainer, None
    with pytest.raises(error[0], match=error[1]) as raised:
        trainer.fit(clf, datamodule=_digits())
    return clf, trainer, raised.value


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("optimizer", [SGD_MOMENTUM, ADAMW, ADAMW_FUSED], ids=["sgd-momentum", "adamw", "adamw-fused"])
def test_an_inf_gradient_between_logging_steps_never_reaches_the_weights(optimizer):
    # log_every_n_steps=50 and 12 steps: no logging step at all, the end-of-fit check names step 5
    clf, trainer, error = _fit([InjectInf(5)], optimizer, steps=12,
                               error=(FloatingPointError, r"optimizer step 5 \(epoch 0, batch 5\) \(after the last "
                                      r"logging step\): a gradient was not finite.*1 step\(s\).*on_nonfinite='warn'"))
    assert trainer.global_step == 12
    reference, _, _ = _fit([DropStep(5)], optimizer, steps=12)
    _assert_same(_weights(clf), _weights(reference))  # bit-identical to a run that skipped step 5
    state = trainer.optimizers[0].state_dict()["state"]
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_the_fit_stops_at_the_next_logging_step_and_last_ckpt_is_finite(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    clf, trainer, _ = _fit([InjectInf(5), checkpoint], ADAMW, steps=40, log_every=10, enable_checkpointing=True,
                           error=(FloatingPointError, r"optimizer step 5 \(epoch 0, batch 5\): a gradient"))
    assert trainer.global_step == 10  # stopped at the logging step that followed, not at the end
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    reference, _, _ = _fit([DropStep(5)], ADAMW, steps=10)
    _assert_same(saved, _weights(reference))


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_opting_out_trains_on_with_the_weights_of_a_run_that_skipped_the_step(policy):
    if policy == "warn":
        with pytest.warns(UserWarning, match=r"skipped the update of optimizer step 5"):
            clf, trainer, _ = _fit([InjectInf(5, float("nan"))], ADAMW, policy=policy, steps=12, log_every=4)
    else:
        clf, trainer, _ = _fit([InjectInf(5, float("nan"))], ADAMW, policy=policy, steps=12, log_every=4)
    assert trainer.global_step == 12
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    reference, _, _ = _fit([DropStep(5)], ADAMW, steps=12)
    _assert_same(_weights(clf), _weights(reference))


def test_bf16_mixed_and_accumulation_name_the_optimizer_step_of_a_nan_loss():
    # accumulate 2: batches 10 and 11 form optimizer step 5; a NaN image in batch 10 makes that window's loss NaN
    clf, trainer, _ = _fit([EditBatch(10, image=float("nan"))], ADAMW, steps=8, log_every=50,
                           precision="bf16-mixed", accumulate_grad_batches=2,
                           error=(FloatingPointError, r"optimizer step 5 \(epoch 0, batch 11\).*: the training loss "
                                  r"was nan and a gradient was not finite"))
    reference, _, _ = _fit([DropStep(5, accumulate=2)], ADAMW, steps=8, precision="bf16-mixed",
                           accumulate_grad_batches=2)
    _assert_same(_weights(clf), _weights(reference))


def test_no_host_sync_on_non_logging_steps_even_when_a_step_is_skipped():
    dm = _digits()
    window = SyncWindow(datamodule=dm)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, optimizer=ADAMW, on_nonfinite="skip")
    trainer = tiny_trainer(max_steps=8, log_every_n_steps=4, limit_val_batches=0, callbacks=[InjectInf(2), window])
    with count_host_syncs(window.current, window.enabled):
        trainer.fit(clf, datamodule=dm)
    counts = window.counts  # keyed by global_step after the step: 4 and 8 are the logging steps
    assert len(counts) == 8
    quiet = {step: c for step, c in counts.items() if step not in (4, 8)}  # the first step too
    assert all(not c for c in quiet.values()), quiet
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1


class _GuardCopies(Callback):
    def on_train_end(self, trainer, pl_module) -> None:  # before the module's own on_train_end detaches the guard
        guard = pl_module._guard
        buffers = guard._module_buffers.groups if guard._module_buffers else []
        self.copies = (guard.owns_skip, len(guard._undo), sum(len(group.tensors) for group in buffers))


def test_with_gradient_clipping_the_callback_skips_and_the_module_copies_nothing():
    clip, spy = GradientClipping(threshold=1e9, max_consecutive_skips=None), _GuardCopies()
    clf, trainer, _ = _fit([InjectInf(5), clip, spy], SGD_MOMENTUM, steps=12)  # a gradient-only event: the callback's
    assert clip.state_dict()["tensors"]["skipped"] == 1
    assert spy.copies == (False, 0, 0)
    reference, _, _ = _fit([DropStep(5)], SGD_MOMENTUM, steps=12)
    _assert_same(_weights(clf), _weights(reference))
    # a NaN loss: the module's NaN-multiplied loss makes GradientClipping skip the step, and the module reports it
    clip = GradientClipping(threshold=1e9, max_consecutive_skips=None)
    clf, _, _ = _fit([EditBatch(3, image=float("nan")), clip], SGD_MOMENTUM, steps=12,
                     error=(FloatingPointError, r"optimizer step 3 .*the training loss was nan"))
    assert clip.state_dict()["tensors"]["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in clf.state_dict().values())


def test_under_fp16_the_grad_scaler_skips_overflows_and_the_module_reports_nan_losses():
    def fp16():  # a GradScaler on the CPU: Lightning makes one only for CUDA
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]

    spy = _GuardCopies()
    clf, trainer, _ = _fit([InjectInf(5, after_backward=True), spy], ADAMW, steps=8, plugins=fp16())
    # the scaler skips: the module copies no parameters or state, only the buffers (for NaN-loss batches)
    assert spy.copies == (False, 0, len(list(clf.buffers())))
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # it did skip the overflow (and lowered its scale)
    assert all(torch.isfinite(v).all() for v in clf.state_dict().values())
    clf, _, _ = _fit([EditBatch(3, image=float("nan"))], ADAMW, steps=8, plugins=fp16(),
                     error=(FloatingPointError, r"optimizer step 3 \(epoch 0, batch 3\).*: the training loss was nan"))
    assert all(torch.isfinite(v).all() for v in clf.state_dict().values())


def test_labels_out_of_range_after_the_first_batch_are_skipped_and_named():
    clf, trainer, _ = _fit([EditBatch(3, label=12)], SGD_MOMENTUM, steps=12, log_every=8,
                           error=(ValueError, r"labels must lie in \[0, 10\) for num_classes=10; found labels in "
                                  r"\[0, 12\] in the training batches so far.*1 step\(s\) .* the first at optimizer step 3 "
                                  r"\(epoch 0, batch 3\)\."))
    assert trainer.global_step == 8
    reference, _, _ = _fit([DropStep(3)], SGD_MOMENTUM, steps=8)
    _assert_same(_weights(clf), _weights(reference))


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (lambda y: y - 1, ValueError, r"\[0, 10\) for num_classes=10; found labels in \[-1, 8\] in the "
                                      r"training batches so far.*2 step\(s\).*the first at optimizer step 0 \(epoch 0, batch 0\) "
                                      r"\(after the last logging step\)"),
        (lambda y: y + 5, ValueError, r"labels in \[5, 14\] in the training batches so far\. Set num_classes to the data's number of classes"),
        (lambda y: y.float(), TypeError, r"integer class indices in \[0, 10\); got dtype torch.float32"),
        (lambda y: y == 1, TypeError, r"got dtype torch.bool"),
        (lambda y: nn.functional.one_hot(y, 10), ValueError, r"shape \(16,\).*got shape \(16, 10\) \(one-hot"),
    ],
    ids=["negative", "too-large", "float", "bool", "one-hot"],
)
def test_bad_labels_are_refused_and_never_trained_on(labels, error, match):
    # dtype and shape: at once; the range: read at the end of this fit (no logging step), every batch skipped
    seed_everything(0)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    loader = DataLoader(TensorDataset(x, labels(y)), batch_size=16)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8)
    initial = _weights(clf)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0)
    with pytest.raises(error, match=match):
        trainer.fit(clf, train_dataloaders=loader)
    assert trainer.global_step == (2 if error is ValueError and "shape" not in match else 0)
    _assert_same(_weights(clf), initial)


def test_validation_labels_out_of_range_are_reported_at_the_end_of_the_epoch():
    x = torch.randn(32, 1, 8, 8)
    good = DataLoader(TensorDataset(x, torch.arange(32) % 10), batch_size=16)
    bad = DataLoader(TensorDataset(x, torch.arange(32) % 13), batch_size=16)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"found labels in \[0, 12\] in the validation data\. Set"):
        tiny_trainer(max_steps=2, num_sanity_val_steps=0).fit(clf, train_dataloaders=good, val_dataloaders=bad)


class _LastToken(nn.Module):
    """Lightning's demo Transformer LM as a sequence classifier: the logits of the last position."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.lm = Transformer(vocab_size=vocab, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens, tokens).view(tokens.shape[0], tokens.shape[1], -1)[:, -1]


def _transformer_fit(callbacks, policy):
    seed_everything(0)
    tokens = torch.randint(0, 16, (64, 6))
    loader = DataLoader(TensorDataset(tokens, tokens[:, 0]), batch_size=8, shuffle=True)
    clf = ImageClassifier(_LastToken(), num_classes=16, optimizer=ADAMW, on_nonfinite=policy)
    trainer = tiny_trainer(max_steps=6, log_every_n_steps=50, limit_val_batches=0, callbacks=callbacks,
                           precision="bf16-mixed", accumulate_grad_batches=2)
    trainer.fit(clf, train_dataloaders=loader)
    return clf


def test_the_demo_transformer_lm_skips_exactly_under_bf16_and_accumulation():
    skipped = _transformer_fit([InjectInf(3)], "skip")
    reference = _transformer_fit([DropStep(3, accumulate=2)], "skip")
    _assert_same(_weights(skipped), _weights(reference))
    assert all(torch.isfinite(v).all() for v in skipped.state_dict().values())


def test_traincraft_fit_exits_with_the_error_and_keeps_last_ckpt_finite(capsys):
    from traincraft.cli import main

    with pytest.raises(SystemExit) as raised:  # exit status 1, the error printed
        main(["fit", "--trainer.logger=false", "--trainer.max_steps=8", "--trainer.limit_val_batches=0",
              "--checkpoint.monitor=null", "--checkpoint.every_n_train_steps=1", "--checkpoint.filename=step{step}",
              "--trainer.callbacks=[]",  # the module's own guard alone, without the recipe's monitors
              "--trainer.callbacks+=tests.modules.test_classifier_nonfinite.InjectInf",
              "--trainer.callbacks.init_args.step=5"])
    assert raised.value.code == 1
    assert re.search(r"FloatingPointError: ImageClassifier skipped the update of optimizer step 5 \(epoch 0, batch 5\)",
                     capsys.readouterr().err)
    saved = torch.load("runs/checkpoints/last.ckpt", weights_only=False)
    assert saved["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())

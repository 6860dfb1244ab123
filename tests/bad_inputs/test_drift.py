"""Bad inputs to the drift tests and DataDriftMonitor: each message says what was received and what to do. Errors
that depend on the model or the batch are raised at setup or on the first training batch, before any step."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.callbacks.test_data_drift import ZIPF, Pairs, TokenLM, token_set
from tests.helpers import tiny_trainer
from traincraft.callbacks.data_drift import DataDriftMonitor
from traincraft.metrics.drift import ks_pvalues, ks_statistic, ks_test, mmd_test

CONSTRUCTOR = {
    "max_samples too small": ({"max_samples": 2}, ValueError, r"max_samples must be an integer >= 4; got 2\. Pass"),
    "max_samples bool": ({"max_samples": True}, ValueError, r"max_samples must be an integer >= 4; got True"),
    "max_samples string": ({"max_samples": "500"}, ValueError, r"max_samples must be an integer >= 4; got '500'"),
    "alpha above 1": ({"alpha": 5}, ValueError, r"alpha must lie in \(0, 1\); got 5\. The usual choice is 0\.05"),
    "alpha zero": ({"alpha": 0.0}, ValueError, r"alpha must lie in \(0, 1\); got 0\.0"),
    "alpha string": ({"alpha": "0.05"}, ValueError, r"alpha must lie in \(0, 1\); got '0\.05'"),
    "mmd unknown": ({"mmd": "sometimes"}, ValueError, r"mmd must be 'on_ks', 'always' or 'never'; got 'sometimes'"),
    "ks_method unknown": ({"ks_method": "fast"}, ValueError, r"ks_method must be 'auto', 'exact' or 'asymp'; got"),
    "permutations too few": ({"num_permutations": 10}, ValueError, r"at least 19\); got 10"),
    "permutations float": ({"num_permutations": 100.0}, ValueError, r"num_permutations must be an integer >= 19"),
    "seed string": ({"seed": "0"}, ValueError, r"seed must be an integer .* got '0'"),
    "layer not a name": ({"layer": 3}, TypeError, r"layer must be a module name \(str\) or None; got int 3"),
    "features not callable": ({"features": 42}, TypeError, r"features must be a callable features\(batch\) -> "
                                                           r"Tensor, a dotted import path .* got int 42"),
    "layer and features": ({"layer": "fc", "features": len}, ValueError, r"pass layer= or features=, not both"),
    "forward unknown": ({"forward": "kwargs"}, ValueError, r"forward must be 'input' .* or 'unpack' .* got 'kwargs'"),
    "reduce unknown": ({"reduce": "max"}, ValueError, r"reduce must be 'mean', 'last' or 'flatten' .* got 'max'"),
    "input_key float": ({"input_key": 1.5}, TypeError, r"input_key must be an int .* a str .* or None; got float"),
    "input_key bool": ({"input_key": True}, TypeError, r"input_key must be an int .* got bool True"),
    "features with input_key": ({"features": len, "input_key": 0}, ValueError,
                                r"features= receives the whole batch .* input_key and forward do not apply"),
    "features with unpack": ({"features": len, "forward": "unpack"}, ValueError,
                             r"features= receives the whole batch .* \(got input_key=None, forward='unpack'\)"),
    "unpack with input_key": ({"forward": "unpack", "input_key": "x"}, ValueError,
                              r"forward='unpack' passes the whole batch .* input_key='x' does not apply"),
    "features not dotted": ({"features": "pixel_energy"}, ValueError, r"features='pixel_energy' is not a dotted "
                                                                      r"import path; give 'package\.module\.function'"),
    "features module missing": ({"features": "no_such_pkg.fn"}, ValueError,
                                r"cannot import module 'no_such_pkg' .* Check the spelling"),
    "features function missing": ({"features": "math.no_such_fn"}, ValueError,
                                  r"module 'math' has no callable 'no_such_fn'; its public callables include"),
}


@pytest.mark.parametrize("kwargs,error,message", list(CONSTRUCTOR.values()), ids=list(CONSTRUCTOR))
def test_bad_configuration_is_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        DataDriftMonitor(**kwargs)


REFERENCES = {
    "1-D": (torch.zeros(3), r"\(samples >= 2, features\) tensor; got \(3,\)"),
    "one row": (torch.zeros(1, 4), r"\(samples >= 2, features\) tensor; got \(1, 4\)"),
    "a list": ([[0.0, 1.0]], r"\(samples >= 2, features\) tensor; got list"),
}


@pytest.mark.parametrize("reference,message", list(REFERENCES.values()), ids=list(REFERENCES))
def test_bad_fixed_reference(reference, message):
    with pytest.raises(ValueError, match=message):
        DataDriftMonitor().set_reference(reference)


# ------------------------------------------------------------------ refused before the first step, on real models
class Vectors(LightningModule):
    """forward(x) on (x, label) batches; ``unused`` never runs, ``conv`` gives 4-D maps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)
        self.steps = 0

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Images(Vectors):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x).mean((1, 2, 3))[:, None].expand(-1, 4) @ self.fc.weight.T


class DictVectors(Vectors):
    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self(batch["pixels"][:, :4]).sum()


def _vectors():
    return DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(16)), batch_size=8)


def _lm_tokens():
    return DataLoader(token_set(ZIPF, 16, 0), batch_size=8)


NAMES = r"\['model\.embedding', 'model\.transformer', 'model\.transformer\.encoder'"
FIT = {
    "LM forward(inputs, target) by default": (
        TokenLM, _lm_tokens, {}, TypeError,
        r"calling TokenLM\(input\) with one argument, but TokenLM\.forward requires 2: \(inputs, target\)\. Pass "
        r"forward='unpack' .* layer= a module .* " + NAMES),
    "LM layer without unpack": (
        TokenLM, _lm_tokens, {"layer": "model.transformer.encoder"}, TypeError,
        r"computes the output of layer 'model\.transformer\.encoder' by calling TokenLM\(input\)"),
    "LM output flattens the batch": (
        TokenLM, _lm_tokens, {"forward": "unpack"}, ValueError,
        r"the model's output has shape \(96, 32\): 96 rows for a batch of 8 samples, so its rows are not samples "
        r".* Set layer= .* " + NAMES),
    "LM misspelt layer": (
        TokenLM, _lm_tokens, {"layer": "model.encoder", "forward": "unpack"}, ValueError,
        r"layer='model\.encoder' is not a module of TokenLM; use None .* or one of \['model', 'model\.pos_encoder'"),
    "LM token ids as features": (
        TokenLM, _lm_tokens, {"features": lambda batch: batch[0]}, ValueError,
        r"features=.*lambda.* has dtype torch\.int64 \(shape \(8, 12\)\); drift tests compare floating-point "
        r"features\. Token ids and class indices are labels"),
    "LM last step of an image-like output": (
        TokenLM, _lm_tokens, {"features": lambda batch: torch.zeros(8, 2, 3, 3), "reduce": "last"}, ValueError,
        r"reduce='last' keeps the last time step .* shape \(8, 2, 3, 3\) \(4-D\)\. Use reduce='mean'"),
    "input_key out of range": (
        Vectors, _vectors, {"input_key": 5}, ValueError,
        r"input_key=5 does not index the batch, a list of 2 elements \(list \(tensor \(8, 4\) torch\.float32, "
        r"tensor \(8,\) torch\.int64\)\)\. Pass an integer in \[0, 2\)"),
    "input_key a name for a tuple": (
        Vectors, _vectors, {"input_key": "x"}, ValueError, r"input_key='x' does not index the batch"),
    "input_key picks the labels": (
        Vectors, _vectors, {"input_key": 1}, RuntimeError,
        r"calling Vectors\(batch\[1\]\) on each batch .* that call failed with RuntimeError: .* Pass forward='unpack'"
        r" .*; or layer= an embedding or sequence module \(the input is torch\.int64 ids\)"),
    "layer that never runs": (
        Vectors, _vectors, {"layer": "unused"}, ValueError,
        r"layer 'unused' did not run during Vectors\(batch\[0\]\)\. Choose a module that the forward pass uses, "
        r"e\.g\. one of \['fc', 'unused'\]"),
    "features not a tensor": (
        Vectors, _vectors, {"features": lambda batch: {"x": batch[0]}}, ValueError,
        r"is dict \{'x': tensor \(8, 4\) torch\.float32\}, not a \(samples, \.\.\.\) tensor\. Set layer="),
    "features a scalar": (
        Vectors, _vectors, {"features": lambda batch: batch[0].sum()}, ValueError,
        r"is tensor \(\) torch\.float32, not a \(samples, \.\.\.\) tensor"),
    "features complex": (
        Vectors, _vectors, {"features": lambda batch: torch.complex(batch[0], batch[0])}, ValueError,
        r"is complex \(torch\.complex64\); return real features, e\.g\. torch\.view_as_real"),
    "model output boolean": (
        Vectors, _vectors, {"features": lambda batch: batch[0] > 0}, ValueError, r"has dtype torch\.bool"),
    "dict batch without input_key": (
        DictVectors, lambda: DataLoader(Pairs(torch.randn(16, 4), True), batch_size=8), {}, ValueError,
        r"the batch is a dict with keys \['label', 'pixels'\] and no input_key names none of them\. Pass "
        r"input_key= the key of the model's input \(one of \['label', 'pixels'\]\), forward='unpack'"),
    "dict batch, wrong key": (
        DictVectors, lambda: DataLoader(Pairs(torch.randn(16, 4), True), batch_size=8), {"input_key": "image"},
        ValueError, r"dict with keys \['label', 'pixels'\] and input_key='image' names none of them"),
    "dict batch unpacked into forward(x)": (
        DictVectors, lambda: DataLoader(Pairs(torch.randn(16, 4), True), batch_size=8), {"forward": "unpack"},
        TypeError, r"calling DictVectors\(\*\*batch\) .* failed with TypeError: .*unexpected keyword argument"),
    "tensor batch with input_key": (
        Vectors, lambda: DataLoader(torch.randn(16, 4), batch_size=8), {"input_key": 0}, ValueError,
        r"input_key=0 picks part of a tuple, list or dict batch, but the batch is tensor \(8, 4\) torch\.float32\. "
        r"Set input_key=None"),
    "conv model, last step of its maps": (
        Images, lambda: DataLoader(TensorDataset(torch.randn(16, 1, 5, 5)), batch_size=8),
        {"layer": "conv", "reduce": "last"}, ValueError, r"reduce='last' .* shape \(8, 2, 3, 3\) \(4-D\)"),
}


@pytest.mark.parametrize("model,loader,kwargs,error,message", list(FIT.values()), ids=list(FIT))
def test_refused_before_the_first_step(model, loader, kwargs, error, message):
    module = model()
    trainer = tiny_trainer(max_steps=2, callbacks=[DataDriftMonitor(max_samples=8, **kwargs)])
    with pytest.raises(error, match=message):
        trainer.fit(module, loader())
    assert trainer.global_step == 0 and getattr(module, "steps", 0) == 0


def test_variable_length_flattened_sequences_are_named():
    """Data-dependent, so found at the validation batch that differs: the widths and the fix."""
    batches = [torch.randn(4, 3, 2), torch.randn(4, 5, 2)]
    monitor = DataDriftMonitor(features=lambda batch: batch, reduce="flatten", max_samples=8)
    module = Vectors()
    module.training_step = lambda batch, batch_idx: module.fc.weight.sum()
    module.validation_step = lambda batch, batch_idx: None
    trainer = tiny_trainer(max_steps=1, num_sanity_val_steps=0, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"this batch gives 10 features per sample and earlier batches gave 6; .* "
                                         r"Use reduce='mean' or 'last', or pad"):
        trainer.fit(module, DataLoader(batches[:1], batch_size=None), DataLoader(batches, batch_size=None))


def test_a_fixed_reference_of_another_width_is_named():
    monitor = DataDriftMonitor(max_samples=8, mmd="never")
    monitor.set_reference(torch.zeros(10, 5))
    module = Vectors()
    module.validation_step = lambda batch, batch_idx: None
    trainer = tiny_trainer(max_steps=1, val_check_interval=1, num_sanity_val_steps=0, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"reference features \(10, 5\) and current features \(8, 3\) cannot be "
                                         r"compared; they need the same width"):
        trainer.fit(module, _vectors(), _vectors())


# ------------------------------------------------------------------ the pure functions
_nan = torch.randn(6, 2)
_nan[2, 1] = float("nan")
FUNCTIONS = {
    "ks 1-D sample": (lambda: ks_statistic(torch.zeros(5), torch.zeros(5, 1)),
                      r"x must be a 2-D tensor \(samples, features\); got \(5,\)\. Flatten features first"),
    "ks list sample": (lambda: ks_statistic(torch.zeros(5, 1), [[1.0]]), r"y must be a 2-D tensor .* got list"),
    "ks empty sample": (lambda: ks_statistic(torch.zeros(0, 2), torch.zeros(3, 2)),
                        r"x has 0 samples; the test needs at least 1"),
    "ks widths differ": (lambda: ks_test(torch.zeros(4, 2), torch.zeros(4, 3)),
                         r"x has 2 features and y has 3; both samples must have the same"),
    "ks complex": (lambda: ks_test(torch.zeros(4, 2, dtype=torch.complex64), torch.zeros(4, 2)),
                   r"x is complex \(torch\.complex64\); pass real features"),
    "ks NaN features": (lambda: ks_test(_nan, torch.randn(5, 2)),
                        r"x has 1 of 6 samples and y 0 of 5 with NaN or infinite features; .* drop those rows"),
    "ks alpha above 1": (lambda: ks_test(torch.zeros(4, 1), torch.zeros(4, 1), alpha=5),
                         r"alpha must lie in \(0, 1\); got 5"),
    "ks alpha string": (lambda: ks_test(torch.zeros(4, 1), torch.zeros(4, 1), alpha="0.05"),
                        r"alpha must lie in \(0, 1\); got '0\.05'"),
    "ks p-value method": (lambda: ks_pvalues(torch.tensor([0.1]), 5, 5, "fast"),
                          r"method must be 'auto', 'exact' or 'asymp'; got 'fast'"),
    "ks p-value empty sample": (lambda: ks_pvalues(torch.tensor([0.1]), 0, 5),
                                r"both samples need at least one value; got n=0, m=5"),
    "mmd one row": (lambda: mmd_test(torch.zeros(1, 2), torch.zeros(4, 2)),
                    r"x has 1 samples; the test needs at least 2"),
    "mmd widths differ": (lambda: mmd_test(torch.zeros(4, 2), torch.zeros(4, 3)), r"x has 2 features and y has 3"),
    "mmd no permutations": (lambda: mmd_test(torch.zeros(4, 2), torch.zeros(4, 2), 0),
                            r"num_permutations and chunk_size must be positive"),
    "mmd permutations float": (lambda: mmd_test(torch.zeros(4, 2), torch.zeros(4, 2), 10.5),
                               r"num_permutations and chunk_size must be positive integers; got 10\.5"),
    "mmd negative bandwidth": (lambda: mmd_test(torch.zeros(4, 2), torch.zeros(4, 2), bandwidth=-1.0),
                               r"bandwidth must be positive or None \(median heuristic\); got -1\.0"),
}


@pytest.mark.parametrize("call,message", list(FUNCTIONS.values()), ids=list(FUNCTIONS))
def test_bad_samples_to_the_pure_functions(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nan_features_give_a_nan_mmd_pvalue_not_a_detection():
    result = mmd_test(_nan, torch.randn(5, 2), 50)
    assert torch.isnan(result.statistic) and torch.isnan(result.pvalue)

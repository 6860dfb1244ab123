"""Bad input to the monitors (CovariateShiftMonitor, LearningRateMonitor, LearningRateGovernor, HardExampleMining):
each case asserts that the message names what was received and what is allowed or what to do."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from tests.compat.zoo import GAN, TinyLM
from tests.helpers import tiny_trainer
from traincraft.callbacks import (
    CovariateShiftMonitor,
    HardExampleMining,
    LearningRateGovernor,
    LearningRateMonitor,
)
from traincraft.callbacks._covariate_probe import select_layers

COVSHIFT = [
    ({"layers": "ReLU"}, r"layers must be None or a non-empty list.*got 'ReLU'.*Example: layers="),
    ({"layers": []}, r"layers must be None or a non-empty list.*got \[\]"),
    ({"layers": ["ReLU", ""]}, r"non-empty list of type names or name globs; got \['ReLU', ''\]"),
    ({"layers": [3]}, r"got \[3\]"),
    ({"max_rows": 0}, r"max_rows must be an integer >= 1; got 0"),
    ({"max_rows": 2.5}, r"max_rows must be an integer >= 1; got 2.5"),
    ({"max_rows": True}, r"max_rows must be an integer >= 1; got True"),
    ({"percentile_samples": 1}, r"percentile_samples must be an integer >= 2; got 1"),
    ({"eval_batches": -1}, r"eval_batches must be an integer >= 0; got -1"),
    ({"image_every_n_logs": 0}, r"image_every_n_logs must be an integer >= 1; got 0"),
    ({"feature_axis": "first"}, r"feature_axis must be 'auto', 'channels' .* or 'last' .*got 'first'"),
    ({"feature_axis": -1}, r"feature_axis must be .*got -1\. 'auto' decides per layer"),
]

LR_MONITOR = [
    ({"oscillation_ema": 1.0}, r"oscillation_ema must lie in \[0, 1\); got 1.0\. 0.9 averages"),
    ({"oscillation_ema": -0.1}, r"oscillation_ema must lie in \[0, 1\); got -0.1"),
]

GOVERNOR = [
    ({"down": 1.0}, r"down must be in \(0, 1\); got 1.0"),
    ({"down": 0.0}, r"down must be in \(0, 1\); got 0.0"),
    ({"up": 0.9}, r"up must be >= 1; got 0.9"),
    ({"up": float("inf")}, r"up must be >= 1; got inf"),
    ({"min_factor": 0.0}, r"min_factor must be in \(0, 1\]; got 0.0"),
    ({"min_factor": 1.5}, r"min_factor must be in \(0, 1\]; got 1.5"),
    ({"max_factor": 0.5}, r"max_factor must be >= 1; got 0.5"),
    ({"oscillation_threshold": -1.5}, r"oscillation_threshold must be in \[-1, 1\]; got -1.5"),
    ({"steady_threshold": -0.5}, r"steady_threshold must be in \(oscillation_threshold=-0.2, 1\]; got -0.5"),
    ({"steady_threshold": 1.2}, r"steady_threshold must be in \(oscillation_threshold=-0.2, 1\]; got 1.2"),
    ({"sharpness_threshold": 0.0}, r"sharpness_threshold must be > 0; got 0.0"),
    ({"ema": 1.0}, r"ema must be in \[0, 1\); got 1.0"),
    ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0; got -1"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be an integer >= 0; got 2.5"),
]

MINING = [
    ({"decay": 1.0}, r"decay must lie in \[0, 1\); got 1.0"),
    ({"cap": 0.5}, r"cap must be >= 1 .*got 0.5\. cap=1 is uniform sampling"),
    ({"uniform_mix": 2.0}, r"uniform_mix must lie in \[0, 1\] .*got 2.0"),
    ({"temperature": 0.0}, r"temperature must be a positive finite number; got 0.0"),
    ({"temperature": float("inf")}, r"temperature must be a positive finite number; got inf"),
    ({"warmup_epochs": -1}, r"warmup_epochs must be an integer >= 0; got -1"),
    ({"epoch_size": -5}, r"epoch_size must be None or a positive integer"),
]


@pytest.mark.parametrize(("kwargs", "match"), COVSHIFT, ids=[str(k) for k, _ in COVSHIFT])
def test_covariate_shift_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CovariateShiftMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), LR_MONITOR, ids=[str(k) for k, _ in LR_MONITOR])
def test_lr_monitor_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearningRateMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), GOVERNOR, ids=[str(k) for k, _ in GOVERNOR])
def test_governor_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearningRateGovernor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), MINING, ids=[str(k) for k, _ in MINING])
def test_hard_example_mining_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardExampleMining(**kwargs)


def test_covariate_shift_layers_that_match_nothing_list_the_names_and_types():
    with pytest.raises(ValueError, match=r"layers=\['Conv2d'\] match no module of TinyLM\. Use module type names "
                                         r"\(\[.*'LayerNorm'.*\]\) or globs on module names"):
        select_layers(TinyLM(), ["Conv2d"])


def test_covariate_shift_on_a_model_without_activation_modules_says_to_name_layers():
    with pytest.raises(ValueError, match=r"BoringModel has no activation or normalization modules to monitor "
                                         r"\(functional activations cannot be hooked\)\. Pass layers=\[\.\.\.\] .*'layer'"):
        select_layers(BoringModel(), None)


@pytest.mark.parametrize("model", [BoringModel, TinyLM, GAN], ids=["boring", "transformer", "gan"])
def test_hard_example_mining_without_an_image_datamodule_names_what_to_pass(model):
    with pytest.raises(TypeError, match=r"HardExampleMining replaces the training sampler of a traincraft "
                                        r"ImageDataModule; got no datamodule \(loaders passed directly\)\. Pass one"):
        tiny_trainer(max_steps=1, callbacks=[HardExampleMining()]).fit(model())


@pytest.mark.parametrize("extras", [{"log_update_ratio": True}, {"log_oscillation": True},
                                    {"log_effective_lr": True}], ids=["update_ratio", "oscillation", "effective_lr"])
def test_lr_monitor_extras_refuse_sharded_parameters(dtensor_module, extras):
    name = next(iter(extras))
    with pytest.raises(ValueError, match=rf"LearningRateMonitor cannot compute its extras \({name}: .*\) on sharded "
                                         r"parameters \(DTensor: layer.weight\).*Remove the callback"):
        LearningRateMonitor(**extras).setup(None, dtensor_module, "fit")


def test_governor_refuses_sharded_parameters(dtensor_module):
    with pytest.raises(ValueError, match=r"LearningRateGovernor cannot compute the update cosines it decides from on "
                                         r"sharded parameters \(DTensor: layer.weight\)"):
        LearningRateGovernor().setup(None, dtensor_module, "fit")


@pytest.fixture
def dtensor_module():
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        module = BoringModel()
        mesh = init_device_mesh("cpu", (1,))
        module.layer.weight = nn.Parameter(distribute_tensor(module.layer.weight.detach(), mesh, [Replicate()]))
        yield module
    finally:
        dist.destroy_process_group()


def test_lr_monitor_without_extras_accepts_sharded_parameters(dtensor_module):
    LearningRateMonitor().setup(None, dtensor_module, "fit")  # Lightning's keys read only param_groups
    assert isinstance(dtensor_module.layer.weight, torch.Tensor)

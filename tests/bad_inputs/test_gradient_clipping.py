"""Bad input to GradientClipping and its norm arithmetic: each case asserts that the message names what was
received and what is allowed or what to do. Configuration is refused at construction, module/optimizer/checkpoint
mismatches and sharded layouts it cannot reduce are refused in setup, before a step is taken."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import SingleDeviceStrategy

from tests.helpers import tiny_trainer
from traincraft.callbacks import GradientClipping
from traincraft.metrics.grad_norms import agc_coefficient, norm_power, quantile_threshold, tensor_norms

CONSTRUCTOR = [
    ({"mode": "l2"}, ValueError, r"mode='l2' is not one of 'norm', 'value', 'agc', 'quantile', 'zscore'"),
    ({"mode": "Norm"}, ValueError, r"mode='Norm' is not one of 'norm'"),
    ({"threshold": 0.0}, ValueError, r"threshold must be a positive finite number, got 0.0; e.g. 1.0"),
    ({"threshold": -1.0}, ValueError, r"threshold must be a positive finite number, got -1.0"),
    ({"threshold": math.nan}, ValueError, r"threshold must be a positive finite number, got nan"),
    ({"threshold": math.inf}, ValueError, r"threshold must be a positive finite number, got inf"),
    ({"threshold": "1.0"}, TypeError, r"threshold must be a number, got '1.0' \(str\); write it without quotes"),
    ({"threshold": True}, TypeError, r"threshold must be a number, got True \(bool\)"),
    ({"norm_type": 0.0}, ValueError, r"norm_type must be > 0 or inf, got 0.0; 2.0 is the usual L2 norm"),
    ({"norm_type": -2.0}, ValueError, r"norm_type must be > 0 or inf, got -2.0"),
    ({"norm_type": math.nan}, ValueError, r"norm_type must be > 0 or inf, got nan"),
    ({"norm_type": "inf"}, TypeError, r"norm_type must be a number, got 'inf' \(str\).*float\('inf'\)"),
    ({"mode": "value", "per_layer": True}, ValueError, r"per_layer=True has no meaning for mode='value'.*drop"),
    ({"mode": "agc", "per_layer": True}, ValueError, r"per_layer=True has no meaning for mode='agc'.*drop"),
    ({"mode": "agc", "skip_spikes": True}, ValueError, r"skip_spikes=True needs a norm threshold.*mode='norm'"),
    ({"agc_clipping": 0.0}, ValueError, r"agc_clipping must be > 0 .*got 0.0, 0.001; Brock et al. use 0.01"),
    ({"agc_clipping": -0.01}, ValueError, r"agc_clipping must be > 0 .*got -0.01"),
    ({"agc_clipping": math.nan}, ValueError, r"agc_clipping must be > 0 .*got nan"),
    ({"agc_eps": -1e-3}, ValueError, r"agc_eps >= 0 \(finite\), got 0.01, -0.001"),
    ({"agc_exclude": "head.*"}, ValueError, r"agc_exclude must be a list .*'head.\*'; write agc_exclude=\['head"),
    ({"quantile": -0.1}, ValueError, r"quantile must be in \[0, 1\], got -0.1; AutoClip uses 0.1"),
    ({"quantile": 1.5}, ValueError, r"quantile must be in \[0, 1\], got 1.5"),
    ({"quantile": math.nan}, ValueError, r"quantile must be in \[0, 1\], got nan"),
    ({"history_size": 0}, ValueError, r"history_size must be >= 1 .*got 0, 25; AutoClip keeps 1000"),
    ({"history_size": 2.5}, TypeError, r"history_size must be a whole number, got 2.5 \(float\)"),
    ({"warmup_steps": -1}, ValueError, r"warmup_steps >= 0, got 1000, -1"),
    ({"z_threshold": 0.0}, ValueError, r"need 0 < z_threshold < inf .*got 0.0, 0.97; ZClip uses 2.5"),
    ({"z_threshold": math.inf}, ValueError, r"need 0 < z_threshold < inf .*got inf"),
    ({"ema_decay": 1.0}, ValueError, r"0 <= ema_decay < 1, got 2.5, 1.0; ZClip uses"),
    ({"ema_decay": -0.1}, ValueError, r"0 <= ema_decay < 1, got 2.5, -0.1"),
    ({"max_consecutive_skips": 0}, ValueError, r"max_consecutive_skips must be >= 1 or None, got 0; None never"),
    ({"max_consecutive_skips": -3}, ValueError, r"max_consecutive_skips must be >= 1 or None, got -3"),
    ({"max_consecutive_skips": 2.0}, TypeError, r"max_consecutive_skips must be a whole number, got 2.0.*or None"),
    ({"on_consecutive_skips": "ignore"}, ValueError, r"on_consecutive_skips='ignore' is not 'raise' or 'restore'"),
    ({"skip_method": "x"}, ValueError, r"skip_method='x' is not one of \('auto', 'found_inf', 'snapshot', 'sync'\)"),
    ({"skip_method": "fused"}, ValueError, r"skip_method='fused' is not one of"),
    ({"per_layer": 1}, TypeError, r"per_layer must be True or False, got 1 \(int\)"),
    ({"log_layer_norms": "yes"}, TypeError, r"log_layer_norms must be True or False, got 'yes' \(str\)"),
    ({"restore_buffers": None}, TypeError, r"restore_buffers must be True or False, got None"),
]


@pytest.mark.parametrize("kwargs, error, match", CONSTRUCTOR, ids=[str(c[0]) for c in CONSTRUCTOR])
def test_bad_configuration_is_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientClipping(**kwargs)


FUNCTIONS = [
    (lambda: tensor_norms([torch.ones(2)], 0.0), r"norm_type must be a positive number or inf, got 0.0; use 2.0"),
    (lambda: tensor_norms([torch.ones(2)], -1.0), r"norm_type must be a positive number or inf, got -1.0"),
    (lambda: norm_power(torch.ones(2), math.nan), r"norm_type must be a positive number or inf, got nan"),
    (lambda: quantile_threshold(torch.ones(3, 1), 1.5), r"q must be in \[0, 1\], got 1.5; AutoClip uses 0.1"),
    (lambda: agc_coefficient(torch.ones(2, 2), torch.ones(2, 2), clipping=0.0),
     r"clipping must be > 0 and eps >= 0, got clipping=0.0"),
    (lambda: agc_coefficient(torch.ones(2, 2), torch.ones(2, 2), eps=-1.0), r"got clipping=0.01, eps=-1.0"),
]


@pytest.mark.parametrize("call, match", FUNCTIONS, ids=[f"function{i}" for i in range(len(FUNCTIONS))])
def test_bad_arguments_to_the_norm_arithmetic(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class TwoOptimizers(BoringModel):
    """Two optimizers over the same parameters (each must hold its own)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())


class StrayOptimizer(BoringModel):
    """Steps an optimizer that configure_optimizers did not return, through the strategy."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.stray = torch.optim.SGD(self.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        self.manual_backward(self(batch).sum())
        self.trainer.strategy.optimizer_step(self.stray, closure=lambda: None)


def _fit(module, clip, **kwargs):
    tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[clip], **kwargs).fit(module)


def test_trainer_gradient_clip_val_is_refused():
    with pytest.raises(ValueError, match=r"Trainer\(gradient_clip_val=0.5\) and the GradientClipping callback would "
                                         r"both clip.*remove gradient_clip_val"):
        _fit(BoringModel(), GradientClipping(), gradient_clip_val=0.5)


def test_found_inf_with_a_non_fused_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"skip_method='found_inf' needs a fused optimizer, and optimizer 0 \(SGD\) "
                                         r"is not \(SGD\(\.\.\., fused=True\)\); use skip_method='auto'"):
        _fit(BoringModel(), GradientClipping(skip_method="found_inf"))


def test_a_parameter_in_two_optimizers_is_refused():
    with pytest.raises(ValueError, match=r"a parameter is in optimizers 0 and 1.*Give every parameter to one "
                                         r"optimizer only"):
        _fit(TwoOptimizers(), GradientClipping())


def test_an_optimizer_outside_trainer_optimizers_is_refused():
    with pytest.raises(RuntimeError, match=r"handed a SGD that is not one of the 1 optimizers in trainer.optimizers: "
                                           r"return every optimizer from configure_optimizers"):
        _fit(StrayOptimizer(), GradientClipping())


def test_a_checkpoint_of_another_optimizer_count_is_refused():
    clip = GradientClipping()
    clip.load_state_dict({"steps": 3, "tensors": {}, "optimizers": [{"steps": 3, "tensors": {}}]})
    with pytest.raises(ValueError, match=r"holds 2 optimizer\(s\) but this run has 1: resume with the same "
                                         r"configure_optimizers"):
        _fit(BoringModel(), clip)


def test_a_checkpoint_with_another_history_size_is_refused():
    first = GradientClipping(mode="quantile", history_size=4)
    _fit(BoringModel(), first)
    second = GradientClipping(mode="quantile", history_size=8)
    second.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"history of optimizer 0 has shape \(4, 1\) but this run needs \(8, 1\): "
                                         r"resume with the same history_size"):
        _fit(BoringModel(), second)


# ---------------------------------------------------------------- sharded layouts (a one-process gloo group)
@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Sharded(LightningModule):
    def __init__(self, second_placement=None):
        super().__init__()
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        fully_shard(self.a)
        fully_shard(self.b, shard_placement_fn=(lambda p: Shard(1) if p.ndim == 2 else Shard(0))
                    if second_placement else None)

    def training_step(self, batch, batch_idx):
        return self.b(self.a(batch[0])).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)


class NormGroupStrategy(SingleDeviceStrategy):
    @property
    def gradient_norm_group(self):
        import torch.distributed as dist

        return dist.group.WORLD


@pytest.mark.parametrize("case, match", [
    ("agc", r"mode='agc'\) cannot run on sharded parameters \(DTensor\).*Use mode='norm', 'quantile' or 'zscore'"),
    ("group", r"NormGroupStrategy names a gradient_norm_group and the parameters are sharded.*Use a strategy that "
              r"does only one of them"),
    ("placements", r"needs every sharded parameter on one device mesh with one placement, got \(Shard\(dim=0\),\) "
                   r".*shard the whole model with one fully_shard/HSDP mesh"),
])
def test_sharded_layouts_it_cannot_reduce_are_refused_in_setup(one_rank, case, match):
    clip = GradientClipping(mode="agc" if case == "agc" else "norm")
    kwargs = {"strategy": NormGroupStrategy(torch.device("cpu"))} if case == "group" else {}
    with pytest.raises(ValueError, match=match):
        _fit(Sharded(second_placement=case == "placements"), clip, **kwargs)

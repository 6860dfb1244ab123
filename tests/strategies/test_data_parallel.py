"""Single-process parts of DataParallelStrategy: the hooks' maths and byte counts on real DDP buckets (a 1-rank
gloo group), configuration errors, the registry, a fit that syncs with the host only on logging steps, and the
ledger surviving a checkpoint round trip. The noise-scale formulas are tested in tests/metrics/test_noise_scale.py."""

import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import count_host_syncs, tiny_trainer
from traincraft.models import AlexNet
from traincraft.strategies._compression import (
    GradientSyncState,
    compressed_payload_bytes,
    make_comm_hook,
    orthonormalize_columns,
    powersgd_payload_elements,
)
from traincraft.strategies._registry import register_strategies
from traincraft.strategies.communication import CommunicationLedger
from traincraft.strategies.data_parallel import DataParallelStrategy


@pytest.fixture
def isolated_distributed():
    """Tear down any process group and undo the environment variables Lightning's launcher sets."""
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_rank_group(isolated_distributed):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield


# --- hooks on real DDP buckets -----------------------------------------------------------------------------------


def small_alexnet() -> nn.Module:
    torch.manual_seed(0)
    return AlexNet(num_classes=10, input_size=32, width=0.25, dropout=0.0)  # no dropout: DDP and reference agree


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def run_hook(compression: str, steps: int = 1, rank: int = 1, net=small_net, bucket_cap_mb: float = 0.03):
    """Backward passes through DDP (1 rank) with the named hook; returns ledger, norms, DDP grads, true grads."""
    model = net()
    reference = net()
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    ledger = CommunicationLedger()
    state = GradientSyncState(ledger, world_size=1)
    hook = make_comm_hook(compression, powersgd_rank=rank)
    ddp.register_comm_hook(state, hook)
    applied, true = [], []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, *([32, 32] if net is small_alexnet else [8, 8]), generator=generator)
        y = torch.randint(0, 10, (2,), generator=generator)
        ddp.zero_grad()
        reference.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        nn.functional.cross_entropy(reference(x), y).backward()
        norms = state.close_step()
        ledger.end_step()
        applied.append([p.grad.clone() for p in model.parameters()])
        true.append([p.grad.clone() for p in reference.parameters()])
    return ledger, norms, applied, true, (hook, model)


def test_uncompressed_and_cast_hooks_average_and_count_bytes(one_rank_group):
    params = [tuple(p.shape) for p in small_net().parameters()]
    total = sum(math.prod(s) for s in params)
    for compression, element in [("none", 4), ("fp16", 2), ("bf16", 2)]:
        ledger, (local_sq, global_sq), applied, true, _ = run_hook(compression, steps=2)
        step = ledger.last_step()[("data", "all_reduce")]
        assert step["bytes"] == element * total == compressed_payload_bytes(params, compression)
        assert step["calls"] == 2  # 0.03 MiB buckets: 2 of them (from DDP's second step on), each counted
        dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[compression]
        for got, want in zip(applied[-1], true[-1], strict=True):
            torch.testing.assert_close(got, want.to(dtype).float(), rtol=1e-5, atol=1e-7)
        exact_sq = sum(g.double().square().sum() for g in true[-1])
        assert float(local_sq) == pytest.approx(float(exact_sq), rel=1e-4)  # one rank: local = global
        assert float(global_sq) == pytest.approx(float(exact_sq), rel=1e-2)


def test_powersgd_bytes_match_its_rank(one_rank_group):
    shapes = [tuple(p.shape) for p in small_net().parameters()]
    for rank in (1, 2):
        ledger, *_ = run_hook("powersgd", rank=rank, steps=2)
        sent = ledger.last_step()[("data", "all_reduce")]
        # by hand: factors r(8+27), r(64+288), r(10+64); biases 8 + 64 + 10 dense
        assert sent["bytes"] == 4 * (rank * (35 + 352 + 74) + 82) == 4 * powersgd_payload_elements(shapes, rank)
        assert sent["calls"] == 2 * 3  # each of the 2 buckets holds weights and biases: dense, P and Q


def test_powersgd_rank_one_sends_under_two_percent_of_the_small_alexnet(one_rank_group):
    shapes = [tuple(p.shape) for p in small_alexnet().parameters()]
    ledger, *_ = run_hook("powersgd", rank=1, net=small_alexnet, bucket_cap_mb=25)
    sent = ledger.last_step()[("data", "all_reduce")]["bytes"]
    # every weight is compressed; the biases (24+64+96+96+64+1024+1024+10 = 2402) are sent dense
    factors = sum(s[0] + math.prod(s[1:]) for s in shapes if len(s) > 1)
    assert sent == 4 * (factors + 2402) == 41436
    assert sent / (4 * sum(math.prod(s) for s in shapes)) < 0.02  # 41436 / 7534504 = 0.55%


def test_powersgd_error_feedback_loses_nothing(one_rank_group):
    """What was applied over the steps plus the error still held equals the sum of the true gradients."""
    _, _, applied, true, (hook, model) = run_hook("powersgd", steps=3, rank=1)
    for i, param in enumerate(model.parameters()):
        sum_applied = sum(step[i] for step in applied)
        sum_true = sum(step[i] for step in true)
        if param.dim() == 1:  # biases travel dense: exact at every step
            assert id(param) not in hook.error
            torch.testing.assert_close(sum_applied, sum_true, rtol=1e-5, atol=1e-6)
        else:
            held = hook.error[id(param)].view_as(param)
            assert held.abs().max() > 1e-4 * sum_true.abs().max()  # rank 1 does lose something each step ...
            torch.testing.assert_close(sum_applied + held, sum_true, rtol=1e-4, atol=1e-6)  # ... and keeps it


def test_powersgd_recovers_a_rank_one_gradient_exactly(one_rank_group):
    ledger = CommunicationLedger()
    state = GradientSyncState(ledger, world_size=1)
    hook = make_comm_hook("powersgd", powersgd_rank=1)
    layer = nn.Linear(6, 5, bias=False)
    ddp = DistributedDataParallel(layer)
    ddp.register_comm_hook(state, hook)
    x = torch.randn(1, 6)
    ddp(x).sum().backward()  # gradient ones(5) ⊗ x: rank one
    torch.testing.assert_close(layer.weight.grad, torch.ones(5, 1) * x, rtol=1e-5, atol=1e-6)
    ledger.end_step()
    assert ledger.last_step()[("data", "all_reduce")]["bytes"] == 4 * (5 + 6)  # P (5x1) and Q (6x1)


def test_orthonormalize_columns_matches_qr():
    matrix = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, _ = torch.linalg.qr(matrix)
    ours = orthonormalize_columns(matrix.clone())
    torch.testing.assert_close(ours.abs(), q.abs())  # equal up to each column's sign
    assert torch.equal(orthonormalize_columns(torch.zeros(4, 2)), torch.zeros(4, 2))


# --- configuration and registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compression": "int8"}, "compression='int8' is not supported"),
        ({"compression": "powersgd", "powersgd_rank": 0}, "powersgd_rank must be an integer >= 1; got 0"),
        ({"powersgd_rank": 4}, "set compression='powersgd'"),
        ({"compression": "powersgd", "powersgd_warmup_steps": -1}, "powersgd_warmup_steps must be >= 0"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be > 0"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataParallelStrategy(**kwargs)


def test_registered_names_build_the_strategy():
    register_strategies(StrategyRegistry)
    assert register_strategies(StrategyRegistry) == []  # a second call is harmless
    trainer = pl.Trainer(strategy="traincraft_ddp_powersgd", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert (trainer.strategy.compression, trainer.strategy.powersgd_rank) == ("powersgd", 1)
    names = DataParallelStrategy.registered_names
    for name, (_, params) in names.items():
        assert StrategyRegistry[name]["strategy"] is DataParallelStrategy
        assert StrategyRegistry[name]["init_params"] == params
    StrategyRegistry.register("traincraft_ddp_taken_test", pl.strategies.DDPStrategy)
    try:
        names["traincraft_ddp_taken_test"] = ("", {})
        with pytest.raises(ValueError, match="already registered to DDPStrategy"):
            register_strategies(StrategyRegistry)
    finally:
        del names["traincraft_ddp_taken_test"]
        StrategyRegistry.remove("traincraft_ddp_taken_test")


# --- a real (1-process) fit: no host sync off logging steps, checkpointed ledger ---------------------------------


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def test_no_host_sync_on_non_logging_steps(isolated_distributed):
    counts: dict[int, dict[str, int]] = {}
    current: dict[str, int] = {}
    enabled = [False]

    class Window(pl.Callback):
        def on_train_batch_start(self, *args):
            current.clear()
            enabled[0] = True

        def on_train_batch_end(self, trainer, *args):
            # runs after the strategy's monitor (callbacks added by the user come first, so check order)
            enabled[0] = False
            counts[trainer.global_step] = dict(current)

    strategy = DataParallelStrategy()
    trainer = tiny_trainer(strategy=strategy, max_steps=8, log_every_n_steps=4, callbacks=[Window()],
                           deterministic=False)
    with count_host_syncs(current, enabled):
        trainer.fit(Regression(), loader())
    assert trainer.callbacks.index(strategy.monitor) > trainer.callbacks.index(
        next(c for c in trainer.callbacks if isinstance(c, Window))
    )
    assert len(counts) == 8
    assert all(not c for c in counts.values()), counts  # the monitor's logging syncs fall outside the window
    assert strategy.metrics["comm/data/all_reduce_bytes"] == 4 * (4 * 8 + 8 + 8 + 1)


def test_ledger_totals_survive_a_checkpoint(isolated_distributed, tmp_path):
    payload = 4 * (4 * 8 + 8 + 8 + 1)
    first = DataParallelStrategy(compression="fp16")
    trainer = tiny_trainer(strategy=first, max_epochs=1, log_every_n_steps=2, deterministic=False)
    trainer.fit(Regression(), loader())  # one epoch: 8 steps
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert (first.ledger.steps, first.ledger.total_payload) == (8, 8 * payload // 2)
    second = DataParallelStrategy(compression="fp16")
    trainer = tiny_trainer(strategy=second, max_epochs=2, log_every_n_steps=2, deterministic=False)
    trainer.fit(Regression(), loader(), ckpt_path=tmp_path / "a.ckpt")
    assert (second.ledger.steps, second.ledger.total_payload) == (16, 16 * payload // 2)


def test_ddp_options_pass_through(isolated_distributed):
    strategy = DataParallelStrategy(compression="bf16", static_graph=True, bucket_cap_mb=0.0001,
                                    gradient_as_bucket_view=True, find_unused_parameters=False)
    seen = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.strategy.model)

    trainer = tiny_trainer(strategy=strategy, max_steps=3, log_every_n_steps=3, deterministic=False,
                           callbacks=[Capture()])
    trainer.fit(Regression(), loader())
    ddp = seen[-1]
    assert isinstance(ddp, DistributedDataParallel)
    assert ddp.static_graph and ddp.gradient_as_bucket_view and not ddp.find_unused_parameters
    assert ddp.bucket_bytes_cap == int(0.0001 * 1024 * 1024)
    step = strategy.ledger.last_step()[("data", "all_reduce")]
    assert (step["bytes"], step["wire_bytes"]) == (2 * (4 * 8 + 8 + 8 + 1), 0)  # one rank: nothing on the wire


@pytest.mark.gpu
def test_hooks_and_event_timing_on_cuda(isolated_distributed):
    """The same strategy on one GPU (NCCL): its hook replaces DDP's, bytes counted, busy time from CUDA events."""
    strategy = DataParallelStrategy(compression="fp16")
    trainer = tiny_trainer(strategy=strategy, accelerator="gpu", devices=1, max_steps=4, log_every_n_steps=2,
                           deterministic=False)
    trainer.fit(Regression(), loader())
    assert strategy.metrics["comm/data/all_reduce_bytes"] == 2 * (4 * 8 + 8 + 8 + 1)
    assert strategy.metrics["ddp/step_time_max"] > 0

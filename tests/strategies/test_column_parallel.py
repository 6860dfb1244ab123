"""Single-process parts of the column-parallel strategy: the gather on a group of one, the analytic byte model
against the tensors a real forward exchanges, state-dict slicing/merging/export, the mesh, configuration errors.
The multi-process proofs are in tests/distributed/test_column_parallel_dist.py."""

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry

from traincraft.models.two_column import TwoColumnAlexNet
from traincraft.modules import ImageClassifier
from traincraft.strategies._sync_batchnorm import (
    GlooSyncBatchNorm,
    GroupSyncBatchNorm,
    replace_sync_batchnorm,
)
from traincraft.strategies.column_parallel import ColumnParallelStrategy, register_column_parallel
from traincraft.strategies.column_parallel.byte_model import (
    break_even_batch,
    column_parallel_bytes,
    ddp_bytes,
    exchange_widths,
    parameter_count,
)
from traincraft.strategies.column_parallel.gather import ColumnExchange, gather_columns
from traincraft.strategies.column_parallel.mesh import ColumnMesh
from traincraft.strategies.column_parallel.state import (
    column_slice,
    export_state_dict,
    keep_column,
    key_column,
    merge_columns,
    shard_path,
)
from traincraft.strategies.communication import CommunicationLedger
from traincraft.strategies.data_parallel import DataParallelStrategy

SMALL = dict(num_classes=10, in_channels=1, input_size=16, width=0.25, dropout=0.0)


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.new_group([0])
    dist.destroy_process_group()


@pytest.mark.parametrize("backward", ["sum", "slice"])
def test_gather_on_one_rank_is_the_identity_with_exact_gradients(group_of_one, backward):
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    ledger = CommunicationLedger()
    y = gather_columns(x, group_of_one, 0, [4], backward, ledger)
    assert torch.equal(y, x)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    assert torch.equal(x.grad, weight)
    ledger.end_step()
    # bytes are counted (wire bytes are 0 on a group of one)
    assert ledger.last_step()[("column", "all_gather")] == {"bytes": x.numel() * 4, "wire_bytes": 0, "calls": 1}
    assert (("column", "reduce_scatter") in ledger.last_step()) == (backward == "sum")


def test_gather_rejects_a_tensor_of_the_wrong_width(group_of_one):
    with pytest.raises(ValueError, match=r"width 5 along dim 1 .* got shape \(2, 4\)"):
        gather_columns(torch.zeros(2, 4), group_of_one, 0, [5])


def test_exchange_counts_training_only_and_needs_one_local_column(group_of_one):
    ledger = CommunicationLedger()
    exchange = ColumnExchange(group_of_one, 0, (5,), ledger)
    with torch.no_grad():
        exchange("fc7", [torch.zeros(2, 8)])
    exchange("logits", [torch.zeros(2, 5)])
    ledger.end_step()
    assert ledger.last_step()[("column", "all_gather")]["calls"] == 1
    with pytest.raises(RuntimeError, match="exactly one local column"):
        exchange("fc7", [torch.zeros(2, 8), torch.zeros(2, 8)])


@pytest.mark.parametrize("config", [SMALL, dict(num_classes=11, input_size=227, width=0.125)])
def test_exchange_widths_are_what_a_forward_exchanges(config):
    model = TwoColumnAlexNet(**config)
    seen = {}
    original = model.exchange

    def spy(point, parts):
        seen[point] = max(p[0].numel() for p in parts)  # per sample, the wider column (as the gather pads)
        return original(point, parts)

    model.exchange = spy
    model(torch.zeros(2, model.in_channels, model.input_size, model.input_size))
    assert exchange_widths(model) == seen
    partial = TwoColumnAlexNet(**config, columns=[1])
    assert exchange_widths(partial) == seen


def test_full_size_ratio_and_break_even_against_brute_force():
    widths = {"conv3": 128 * 13 * 13, "fc6": 128 * 6 * 6, "fc7": 2048, "fc8": 2048, "logits": 500}  # the paper
    params = 60_965_224
    ddp = ddp_bytes(params, world_size=2)["wire_bytes"]

    def columns(batch):
        return sum(v["wire_bytes"] for v in column_parallel_bytes(widths, batch).values())

    assert columns(128) / ddp == pytest.approx(0.1284, abs=1e-4)  # the "about 0.13"
    assert columns(256) / ddp == pytest.approx(2 * columns(128) / ddp, rel=1e-6)
    first_worse = next(b for b in range(1, 5000) if columns(b) >= ddp)
    assert first_worse - 1 < break_even_batch(widths, params) <= first_worse


def test_hybrid_bytes_add_the_data_axis_all_reduce():
    bytes_ = column_parallel_bytes({"conv3": 1, "fc6": 1, "fc7": 1, "fc8": 1, "logits": 1}, 2, column_params=100,
                                   data_parallel_size=4)
    assert bytes_[("data", "all_reduce")] == {"bytes": 400, "wire_bytes": 600}


def _full_state():
    torch.manual_seed(0)
    return TwoColumnAlexNet(**SMALL).state_dict()


def test_slices_merge_back_to_the_full_state_dict():
    full = {f"model.{k}": v for k, v in _full_state().items()}
    full["shared.scale"] = torch.ones(3)
    shards = [column_slice(full, c) for c in (0, 1)]
    assert all(key_column(k) in (None, c) for c, shard in enumerate(shards) for k in shard)
    merged = merge_columns(shards)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    shards[1] = {**shards[1], "shared.scale": torch.zeros(3)}
    with pytest.raises(ValueError, match="disagree on the shared entry 'shared.scale'"):
        merge_columns(shards)


def test_keep_column_equals_a_partial_model_with_the_full_weights():
    torch.manual_seed(0)
    model = TwoColumnAlexNet(**SMALL)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    keep_column(model, 1)
    reference = TwoColumnAlexNet(**SMALL, columns=[1])
    assert model.is_partial and model.local_columns == (1,)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="already split for another rank"):
        keep_column(model, 0)


def test_export_merges_a_checkpoint_directory(tmp_path):
    full = _full_state()
    for column in (0, 1):
        shard = {"state_dict": column_slice({f"model.{k}": v for k, v in full.items()}, column)}
        shard_path(tmp_path / "ckpt", column).parent.mkdir(exist_ok=True)
        torch.save(shard, shard_path(tmp_path / "ckpt", column))
    exported = export_state_dict(tmp_path / "ckpt")
    TwoColumnAlexNet(**SMALL).load_state_dict(exported)  # strict
    assert all(torch.equal(exported[k], v) for k, v in full.items())
    with pytest.raises(FileNotFoundError, match="not a column-parallel checkpoint directory"):
        export_state_dict(tmp_path / "missing")


def test_mesh_coordinates():
    mesh = ColumnMesh(data_size=3)
    assert [mesh.coords(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert mesh.data_ranks(0) == [0, 2, 4] and mesh.column_ranks(2) == [4, 5] and mesh.world_size == 6


def test_bad_configuration_is_rejected_at_construction(tmp_path):
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer or None, got True"):
        ColumnParallelStrategy(data_parallel_size=True)
    with pytest.raises(FileNotFoundError, match="init_weights='nope.pt' is not a file"):
        ColumnParallelStrategy(init_weights="nope.pt")


def test_registered_name_builds_the_strategy():
    register_column_parallel(StrategyRegistry)
    register_column_parallel(StrategyRegistry)  # a second registration is a no-op
    trainer = pl.Trainer(strategy="column_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ColumnParallelStrategy)


@pytest.mark.parametrize("model, error, match", [
    ("convnet", TypeError, "holds none"),
    ("alexnet_two_column", ValueError, r"needs 2 x data_parallel_size processes .* got world_size=1"),
])
def test_fit_rejects_other_models_and_a_single_process(model, error, match):
    clf = ImageClassifier(model, num_classes=10, in_channels=1, input_size=16)
    trainer = pl.Trainer(strategy=ColumnParallelStrategy(), accelerator="cpu", devices=1, logger=False,
                         max_steps=1, enable_progress_bar=False, enable_model_summary=False)
    environment = dict(os.environ)  # Lightning sets MASTER_ADDR/PORT: later launches must not inherit them
    try:
        with pytest.raises(error, match=match):
            trainer.fit(clf, train_dataloaders=[(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def test_parameter_count_of_a_column_is_half_for_an_even_class_count():
    assert 2 * parameter_count(TwoColumnAlexNet(**SMALL, columns=[0])) == parameter_count(TwoColumnAlexNet(**SMALL))


def test_both_strategies_log_through_the_same_monitor():
    column, data = ColumnParallelStrategy(), DataParallelStrategy()
    assert type(column.monitor) is type(data.monitor)
    assert column.monitor.strategy is column and column.ledger is not data.ledger
    # the column shards keep the ledger in their own entry: the monitor adds nothing to their checkpoints, while
    # DataParallelStrategy's checkpoints keep the ledger under the monitor's old key
    assert column.monitor.state_dict() == {}
    assert data.monitor.state_key == "DataParallelMonitor" and set(data.monitor.state_dict()) == {"ledger"}
    assert column.metrics == {} and not column.step_times  # the columns wait for each other at every exchange


def test_sync_batchnorm_converts_over_the_group_it_is_given(group_of_one):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    synced = GroupSyncBatchNorm(group_of_one).apply(model)
    assert isinstance(synced[1], torch.nn.SyncBatchNorm) and synced[1].process_group is group_of_one
    replace_sync_batchnorm(synced, CommunicationLedger())
    assert isinstance(synced[1], GlooSyncBatchNorm) and synced[1].group is group_of_one and synced[1].world_size == 1
    x = torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(synced(x), torch.nn.functional.batch_norm(
        synced[0](x), None, None, synced[1].weight, synced[1].bias, training=True))

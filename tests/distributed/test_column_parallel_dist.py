"""Real column-parallel runs (gloo, CPU) against single-process references in plain torch.

Two launches: 2 processes (two columns: equivalence, gradient norm, bytes, memory, host syncs, logging, resume,
init_weights, export, bf16 AMP) and 4 processes (the 2x2 data x column hybrid, also with synchronized batch norm).
"""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from traincraft.models.two_column import TwoColumnAlexNet
from traincraft.strategies.column_parallel import export_state_dict
from traincraft.strategies.column_parallel.byte_model import (
    column_parallel_bytes,
    exchange_widths,
    parameter_count,
)

SCRIPT = Path(__file__).with_name("_column_script.py")
ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(num_classes=10, in_channels=1, input_size=16, width=0.25, dropout=0.0)


def _launch(out: Path, world: int) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TEST_WORLD": str(world)}
    # a session of its own, so that a timeout ends the ranks Lightning launched as well
    with subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("columns") / "run"
    return out, _launch(out, 2)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "run"
    return out, _launch(out, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    # the references are tiny: on a busy 2-core machine several threads make them ~50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(init: dict, batches: list[tuple[torch.Tensor, torch.Tensor]], clip: float = 0.0, batchnorm=False):
    """Single-process TwoColumnAlexNet trained with the same SGD on the given batches: losses, weights, norms
    (before clipping the gradient norm to `clip`, if given); with `batchnorm`, BatchNorm2d in place of each
    column's first LRN (initialized as BatchNorm2d is)."""
    model = TwoColumnAlexNet(**MODEL)
    if batchnorm:
        from tests.distributed._column_script import with_batchnorm

        with_batchnorm(model)
    missing, unexpected = model.load_state_dict(init, strict=False)
    assert not unexpected and all(".norm1." in key for key in missing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, weights, norms = [], [], []
    for images, labels in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        norms.append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.detach())
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    return losses, weights, norms


def _assert_column_weights(partial: dict, full: dict, column: int, atol: float = 1e-5) -> None:
    assert partial and all(f"columns.{column}." in k for k in partial)
    for key, value in partial.items():
        torch.testing.assert_close(value, full[key], atol=atol, rtol=0, msg=key)


def test_two_columns_match_single_process_step_by_step(two):
    out, ranks = two
    # both column ranks saw the same (augmented) images: the augmentation is seeded by the data rank
    for a, b in zip(ranks[0]["images"], ranks[1]["images"], strict=True):
        assert torch.equal(a, b)
    batches = list(zip(ranks[0]["images"], ranks[0]["labels"], strict=True))
    assert len(batches) == 6
    losses, weights, norms = _reference(torch.load(out / "init_full.pt"), batches)
    for rank in ranks:
        torch.testing.assert_close(torch.stack(rank["losses"]), torch.stack(losses), atol=1e-5, rtol=0)
        for step in range(6):
            _assert_column_weights(rank["weights"][step], weights[step], rank["column"])
        # the gradient norm over the column group is the whole model's (what gradient clipping needs)
        torch.testing.assert_close(torch.stack(rank["norms"]), torch.stack(norms), rtol=1e-5, atol=0)
    assert [r["column"] for r in ranks] == [0, 1] and [r["data_rank"] for r in ranks] == [0, 0]


def test_bytes_match_the_analytic_model_and_are_logged(two):
    out, ranks = two
    widths = exchange_widths(TwoColumnAlexNet(**MODEL))
    expected = column_parallel_bytes(widths, batch=16)
    for rank in ranks:
        assert rank["ledger_steps"] == 6
        assert {k: {"bytes": v["bytes"], "wire_bytes": v["wire_bytes"]} for k, v in rank["ledger"].items()} == expected
        assert rank["ledger"][("column", "all_gather")]["calls"] == 5  # conv3, fc6, fc7, fc8, logits
        assert rank["ledger"][("column", "reduce_scatter")]["calls"] == 4  # no backward exchange at the logits
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    comm = [r for r in rows if r["comm/column/all_gather_bytes"]]
    assert [int(r["step"]) for r in comm] == [1, 3, 5]  # logging steps only (log_every_n_steps=2)
    # logged by the monitor both strategies share, through pl_module.log: floats, exact (float64)
    assert float(comm[0]["comm/wire_bytes"]) == sum(v["wire_bytes"] for v in expected.values())
    assert any(r["val/acc"] for r in rows) and any(r["train/loss_step"] for r in rows)


def test_memory_per_rank_is_half_the_full_model(two):
    _, ranks = two
    full = TwoColumnAlexNet(**MODEL)
    optimizer = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    full(torch.zeros(2, 1, 16, 16)).sum().backward()
    optimizer.step()
    full_params = sum(p.numel() * p.element_size() for p in full.parameters())
    full_state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor))
    for rank in ranks:
        ratio = (rank["param_bytes"] + rank["optimizer_bytes"]) / (full_params + full_state)
        assert ratio == pytest.approx(0.5, abs=1e-9)  # 10 classes: the columns are the same size


def test_no_host_sync_on_non_logging_steps(two):
    _, ranks = two
    for rank in ranks:
        quiet = {step: c for step, c in rank["quiet_syncs"].items() if step % 2 == 1}
        assert len(quiet) == 3 and all(not c for c in quiet.values()), quiet


def test_resume_and_init_weights_equal_the_uninterrupted_run(two):
    out, ranks = two
    # ModelCheckpoint wrote directories of column shards (the best one and last)
    assert sorted(p.name for p in (out / "ckpts" / "last.ckpt").iterdir()) == ["column-0.ckpt", "column-1.ckpt"]
    assert len(list((out / "ckpts").iterdir())) == 2
    for rank in ranks:
        # 3 steps from init_weights (built with other initial weights), checkpoint, 3 more after resuming
        _assert_column_weights(rank["resumed"], rank["weights"][-1], rank["column"], atol=1e-6)
        assert rank["resumed_ledger"] == rank["ledger_state"]  # the byte totals continue across the resume


def test_exported_state_dict_reproduces_the_column_parallel_outputs(two):
    out, ranks = two
    state = export_state_dict(out / "final")
    assert sorted(state) == sorted(TwoColumnAlexNet(**MODEL).state_dict())
    for rank in ranks:
        for key, value in rank["resumed"].items():
            assert torch.equal(state[key], value)
    model = TwoColumnAlexNet(**MODEL)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
    for rank in ranks:
        torch.testing.assert_close(rank["eval_logits"], logits, atol=1e-5, rtol=0)


def test_gradient_clipping_uses_the_norm_of_both_columns(two):
    out, ranks = two
    batches = list(zip(ranks[0]["images"][:3], ranks[0]["labels"][:3], strict=True))
    _, weights, norms = _reference(torch.load(out / "init_full.pt"), batches, clip=5.0)
    assert max(norms) > 5.0  # some step is clipped
    for rank in ranks:
        torch.testing.assert_close(torch.stack(rank["clipped"]["norms"]), torch.stack(norms), rtol=1e-5, atol=0)
        for step in range(3):
            _assert_column_weights(rank["clipped"]["weights"][step], weights[step], rank["column"])


def test_bf16_autocast_matches_float32_to_bf16_precision(two):
    out, ranks = two
    init = torch.load(out / "init_full.pt")
    losses, weights, _ = _reference(init, [(ranks[0]["images"][0], ranks[0]["labels"][0])])
    for rank in ranks:
        amp = rank["amp"]
        assert torch.equal(amp["images"][0], ranks[0]["images"][0])
        torch.testing.assert_close(amp["losses"][0], losses[0], rtol=2e-2, atol=0)
        assert all(torch.isfinite(v).all() for step in amp["weights"] for v in step.values())
        # after one step, the bf16 run's weights differ from float32's by a small part of the update
        first = amp["weights"][0]
        error = max((first[k] - weights[0][k]).abs().max() for k in first)
        update = max((weights[0][k] - init[k]).abs().max() for k in first)
        assert error < 0.1 * update, (error, update)


def test_hybrid_matches_single_process_on_the_global_batch(hybrid):
    out, ranks = hybrid
    assert [(r["data_rank"], r["column"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for step in range(6):
        assert torch.equal(ranks[0]["images"][step], ranks[1]["images"][step])  # columns of a replica
        assert torch.equal(ranks[2]["images"][step], ranks[3]["images"][step])
        assert not torch.equal(ranks[0]["labels"][step], ranks[2]["labels"][step])  # replicas: other samples
    halves = [list(zip(ranks[r]["images"], ranks[r]["labels"], strict=True)) for r in (0, 2)]
    global_batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*halves, strict=True)]
    init = torch.load(out / "init_full.pt")
    _, weights, norms = _reference(init, global_batches)
    for rank in ranks:
        for step in range(6):
            _assert_column_weights(rank["weights"][step], weights[step], rank["column"])
        torch.testing.assert_close(torch.stack(rank["norms"]), torch.stack(norms), rtol=1e-5, atol=0)
    # each replica's loss is the mean over its half of the global batch, at the same weights
    model = TwoColumnAlexNet(**MODEL)
    model.load_state_dict(init)
    for r, (images, labels) in zip((0, 2), (halves[0][0], halves[1][0]), strict=True):
        torch.testing.assert_close(ranks[r]["losses"][0], F.cross_entropy(model(images), labels), atol=1e-5, rtol=0)


def test_hybrid_accounts_both_mesh_axes(hybrid):
    _, ranks = hybrid
    widths = exchange_widths(TwoColumnAlexNet(**MODEL))
    column_params = parameter_count(TwoColumnAlexNet(**MODEL, columns=[0]))
    expected = column_parallel_bytes(widths, batch=8, column_params=column_params, data_parallel_size=2)
    for rank in ranks:
        assert {k: {"bytes": v["bytes"], "wire_bytes": v["wire_bytes"]} for k, v in rank["ledger"].items()} == expected


def test_sync_batchnorm_synchronizes_each_column_over_its_replicas(hybrid):
    """Trainer(sync_batchnorm=True) under the hybrid: batch statistics over the global batch of each column (its
    data-parallel group), so every step equals a single-process run with plain batch norm on the global batch."""
    out, ranks = hybrid
    runs = [rank["batchnorm"] for rank in ranks]
    for run in runs:
        assert run["types"] == ["GlooSyncBatchNorm"]  # one per rank: its column's norm1, converted on CPU
        assert run["ledger"][("batchnorm", "all_reduce")]["calls"] == 2  # forward statistics and their gradient
    halves = [list(zip(runs[r]["images"], runs[r]["labels"], strict=True)) for r in (0, 2)]
    global_batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*halves, strict=True)]
    _, weights, _ = _reference(torch.load(out / "init_full.pt"), global_batches, batchnorm=True)
    for rank, run in zip(ranks, runs, strict=True):
        assert any(".norm1.running_mean" in key for key in run["weights"][0])
        for step in range(3):
            _assert_column_weights(run["weights"][step], weights[step], rank["column"])

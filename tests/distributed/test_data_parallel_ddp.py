"""Two real processes (gloo, CPU) with DataParallelStrategy against single-process references: the same weights
as full-global-batch training, the analytic byte counts, the noise scale from per-example gradients, stragglers,
gradient accumulation without sync, and a torchrun launch of 2 processes as 2 nodes on loopback."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tests.distributed import _ddp_strategy_script as script
from traincraft.strategies._compression import compressed_payload_bytes

SCRIPT = Path(script.__file__)
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_strategy")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(out)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=out)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)] + [out]


def reference(steps: int, accumulate: int = 1, lr: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Plain single-process SGD on the global micro-batches (both ranks' examples concatenated)."""
    net = script.conv_net()
    x, y = script.conv_data(2 * script.MICRO * 2 * 5)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    losses, global_micro = [], 2 * script.MICRO
    for step in range(steps):
        optimizer.zero_grad()
        for j in range(accumulate):
            k = step * accumulate + j
            loss = nn.functional.cross_entropy(net(x[k * global_micro : (k + 1) * global_micro]),
                                               y[k * global_micro : (k + 1) * global_micro])
            (loss / accumulate).backward()
            losses.append(loss.detach())
        optimizer.step()
    return torch.stack(losses), net.state_dict()


def shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in script.conv_net().parameters()]


@pytest.mark.parametrize("name, accumulate", [("exact", 1), ("accumulate", 2)])
def test_two_processes_train_like_one_process_on_the_global_batch(runs, name, accumulate):
    steps = 5 if accumulate == 1 else 3
    losses, state = reference(steps, accumulate)
    # each rank's loss is the mean over its half of the global micro-batch; their mean is the global loss
    ddp_losses = (runs[0][name]["losses"] + runs[1][name]["losses"]) / 2
    torch.testing.assert_close(ddp_losses, losses, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):
        for key, value in state.items():
            torch.testing.assert_close(runs[rank][name]["state"][key], value, rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_runs_on_cpu(runs):
    # Trainer(sync_batchnorm=True) installs torch's SyncBatchNorm, which DDP refuses on CPU: the strategy swaps it
    assert runs[0]["exact"]["batchnorm"] == ["GlooSyncBatchNorm"]
    # its statistics exchange: (Σx, Σx², count) in float64 for 6 channels, forward and backward, per micro-batch
    assert runs[0]["exact"]["metrics"]["comm/batchnorm/all_reduce_bytes"] == 2 * 8 * (2 * 6 + 1)
    assert runs[0]["accumulate"]["last_step"]["batchnorm/all_reduce"]["bytes"] == 2 * 2 * 8 * (2 * 6 + 1)


def test_accounting_equals_the_analytic_byte_counts(runs):
    params = sum(math.prod(s) for s in shapes())
    # broadcast from rank 0 before each forward: `scale` (5 fp32), BN running mean and var (6 fp32 each) and
    # num_batches_tracked (1 int64)
    buffers = 5 * 4 + 2 * 6 * 4 + 8
    batchnorm = 2 * 8 * (2 * 6 + 1)
    for rank in (0, 1):
        for name, payload in [("exact", 4 * params), ("fp16", 2 * params), ("bf16", 2 * params),
                              ("powersgd", compressed_payload_bytes(shapes(), "powersgd", rank=1))]:
            run = runs[rank][name]
            assert run["last_step"]["data/all_reduce"]["bytes"] == payload
            # the ring all-reduce over 2 ranks sends 2(n-1)/n = 1x the payload
            assert run["metrics"]["comm/data/all_reduce_wire_bytes"] == payload
            assert run["metrics"]["comm/data/broadcast_bytes"] == buffers
            assert run["metrics"]["comm/data/broadcast_wire_bytes"] == (buffers if rank == 0 else 0)
            assert run["metrics"]["comm/bytes"] == payload + buffers + batchnorm
            assert run["total_payload"] == run["ledger_steps"] * (payload + buffers + batchnorm)
        assert runs[rank]["fp16"]["metrics"]["comm/data/all_reduce_bytes"] * 2 == 4 * params  # fp16 halves them
        # PowerSGD rank 1: factors (6+9) for the conv and (10+384) for the linear weight; conv and linear biases
        # and the BN weight and bias (6 + 10 + 6 + 6) travel dense
        assert runs[rank]["powersgd"]["metrics"]["comm/data/all_reduce_bytes"] == 4 * (15 + 394 + 28)
        assert runs[rank]["powersgd"]["last_step"]["data/all_reduce"]["calls"] == 3  # dense, P, Q
    # accumulation: one all-reduce per optimizer step, none on the accumulating micro-batch
    assert runs[0]["accumulate"]["last_step"]["data/all_reduce"] == {"bytes": 4 * params, "wire_bytes": 4 * params,
                                                                     "calls": 1}
    assert runs[0]["accumulate"]["total_payload"] == 3 * (4 * params + buffers + 2 * batchnorm)


def test_compressed_gradients_train_close_to_exact_ones(runs):
    exact = runs[0]["exact"]["state"]
    for name, tolerance in [("fp16", 2e-3), ("bf16", 2e-2)]:
        for rank in (0, 1):
            for key, value in runs[rank][name]["state"].items():
                torch.testing.assert_close(value, exact[key], rtol=0, atol=tolerance)
    # PowerSGD: both replicas stay identical, and the loss still falls over the five steps
    for key, value in runs[0]["powersgd"]["state"].items():
        torch.testing.assert_close(runs[1]["powersgd"]["state"][key], value, rtol=0, atol=0)


def test_straggler_shows_in_the_step_time_spread(runs):
    metrics = runs[0]["noise"]["metrics"]
    assert metrics == runs[1]["noise"]["metrics"]  # gathered: the same figures on both ranks
    # rank 1 sleeps 5 ms per step before its gradients are ready; rank 0's busy time excludes waiting for it
    assert metrics["ddp/step_time_max"] >= 0.005
    assert metrics["ddp/step_time_spread"] > 1.3


def test_metrics_reach_the_logger_on_the_logging_step(runs):
    metrics = runs[0]["exact"]["metrics"]
    header, row = (out := (runs[2] / "csv" / "version_0" / "metrics.csv").read_text().splitlines())[0], out[1]
    logged = dict(zip(header.split(","), row.split(","), strict=True))
    for key in ("comm/data/all_reduce_bytes", "comm/batchnorm/all_reduce_bytes", "comm/bytes",
                "ddp/step_time_spread", "ddp/noise_scale", "ddp/grad_sq_norm", "ddp/grad_variance"):
        assert key in logged
    assert float(logged["comm/data/all_reduce_bytes"]) == metrics["comm/data/all_reduce_bytes"]
    assert logged["step"] == "4"  # logged once, at the logging step (log_every_n_steps=5)
    assert runs[0]["exact"]["callback_metrics"]["comm/bytes"] == metrics["comm/bytes"]


def test_noise_scale_matches_per_example_gradient_variance(runs):
    net = script.logistic_net()
    x, y = script.logistic_data()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], dim=1).double()
    mean = flat.mean(0)
    squared = float(mean.square().sum())
    variance = float((flat - mean).square().sum() / (len(x) - 1))  # sampling without replacement: unbiased
    metrics = runs[0]["noise"]["metrics"]
    assert metrics["ddp/noise_scale"] == pytest.approx(variance / squared, rel=0.2)
    assert metrics["ddp/grad_variance"] == pytest.approx(variance, rel=0.2)
    assert metrics["ddp/grad_sq_norm"] == pytest.approx(squared, rel=0.2)


def test_no_host_sync_on_non_logging_steps_in_two_processes(runs):
    for rank in (0, 1):
        counts = runs[rank]["noise"]["sync_counts"]
        assert len(counts) == 512
        assert all(not c for c in counts.values()), {step: c for step, c in counts.items() if c}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_loopback(tmp_path):
    port = _free_port()
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(SCRIPT), str(tmp_path), "nodes"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    for launch in launches:
        _, stderr = launch.communicate(timeout=300)
        assert launch.returncode == 0, stderr[-4000:]
    nodes = [torch.load(tmp_path / f"node{r}.pt", weights_only=False) for r in (0, 1)]
    _, state = reference(steps=3)
    for node_rank, node in enumerate(nodes):
        assert node["strategy"] == "DataParallelStrategy" and node["compression"] == "fp16"
        assert node["environment"] == "TorchElasticEnvironment"
        assert (node["node_rank"], node["global_rank"], node["world_size"]) == (node_rank, node_rank, 2)
        assert node["metrics"]["comm/data/all_reduce_bytes"] == 2 * sum(math.prod(s) for s in shapes())
        for key, value in state.items():
            torch.testing.assert_close(node["state"][key], value, rtol=0, atol=2e-3)  # fp16 gradients

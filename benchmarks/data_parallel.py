"""DataParallelStrategy targets, 2 processes (gloo, CPU) on the small AlexNet (input 32, width 0.25, 10 classes):

1. step time with accounting, straggler timing and noise-scale estimation on (``traincraft_ddp``) against
   Lightning's plain ``"ddp"`` on the same model: ratio <= 1.03 (median over interleaved repeats);
2. PowerSGD rank 1: at most 2% of the uncompressed bytes (from the ledger, against the analytic count).

One ``torchrun --standalone --nproc_per_node 2`` launch runs every fit in turn in the same process group,
alternating the strategies (``ddp``, ``traincraft_ddp``, ``ddp``, ...) so that load changes on a shared machine
hit both alike. Each fit trains ``--steps`` steps on random 32x32 images (``--batch`` per rank); its step time is
the median of the intervals between consecutive ``on_train_batch_end`` calls after ``--warmup`` steps, both in
wall-clock time and in the process's CPU time (all its threads). On a shared machine the wall-clock figures swing
by tens of percent from one fit to the next with the other users' load; the CPU time of the rank-0 process is
far steadier and is what an overhead added by the strategy (hooks, norms, timing) costs.

    .venv/bin/python benchmarks/data_parallel.py [--repeats 7] [--steps 30] [--warmup 5] [--batch 32] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ddp", "traincraft_ddp", "traincraft_ddp_fp16", "traincraft_ddp_powersgd", "traincraft_ddp_accounting")
# traincraft_ddp_accounting: byte accounting and straggler timing only (noise_scale=False), the cost of accounting.


def worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import StrategyRegistry
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from traincraft.models import AlexNet
    from traincraft.strategies._compression import compressed_payload_bytes
    from traincraft.strategies._registry import register_strategies
    from traincraft.strategies.data_parallel import DataParallelStrategy

    register_strategies(StrategyRegistry)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = AlexNet(num_classes=10, input_size=32, width=0.25)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []

        def on_train_batch_end(self, *args) -> None:
            self.ends.append((time.perf_counter(), time.process_time()))

    generator = torch.Generator().manual_seed(int(os.environ["RANK"]))
    n = args.batch * args.steps
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator))
    results: dict[str, list] = {name: [] for name in args.variants}
    cpu: dict[str, list] = {name: [] for name in args.variants}
    ledgers: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in args.variants:
            clock = Clock()
            trainer = pl.Trainer(
                accelerator=args.accelerator, devices=2, max_steps=args.steps, logger=False,
                strategy=DataParallelStrategy(noise_scale=False) if name == "traincraft_ddp_accounting" else name,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[clock], log_every_n_steps=min(10, args.steps), use_distributed_sampler=False,
            )
            module = Module()
            trainer.fit(module, DataLoader(data, batch_size=args.batch))
            ends = clock.ends[args.warmup :]
            results[name].append(statistics.median(b[0] - a[0] for a, b in zip(ends, ends[1:], strict=False)))
            cpu[name].append(statistics.median(b[1] - a[1] for a, b in zip(ends, ends[1:], strict=False)))
            if name != "ddp":
                ledgers[name] = trainer.strategy.metrics
    shapes = [tuple(p.shape) for p in Module().net.parameters()]
    analytic = {c: compressed_payload_bytes(shapes, c, rank=1) for c in ("none", "fp16", "powersgd")}
    if int(os.environ["RANK"]) == 0:
        Path(args.worker_out).write_text(json.dumps(
            {"step_s": results, "cpu_s": cpu, "metrics": ledgers, "analytic": analytic}
        ))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: NCCL, one device per process (benchmarks/gpu_check.py)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "ddp" not in args.variants:
        parser.error("--variants must include ddp, the baseline")
    if args.worker_out:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, *sys.argv[1:], "--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(command, env=env, check=True, cwd=work, stdout=subprocess.DEVNULL)
        figures = json.loads(out.read_text())
    print(f"{'strategy':<26}{'wall ms':>9}{'wall ratio':>12}{'CPU ms':>9}{'CPU ratio':>11}   (medians; ratios of paired runs)")
    for name in figures["step_s"]:
        row = f"{name:<26}"
        for kind in ("step_s", "cpu_s"):
            times, baseline = figures[kind][name], figures[kind]["ddp"]
            ratio = statistics.median(t / b for t, b in zip(times, baseline, strict=True))
            row += f"{1000 * statistics.median(times):>9.1f}{ratio:>{12 if kind == 'step_s' else 11}.3f}"
        print(row)
    analytic = figures["analytic"]
    print(f"\nanalytic payload per step: fp32 {analytic['none']} B, fp16 {analytic['fp16']} B, "
          f"PowerSGD rank 1 {analytic['powersgd']} B ({100 * analytic['powersgd'] / analytic['none']:.2f}%)")
    for name, metrics in figures["metrics"].items():
        sent = metrics.get("comm/data/all_reduce_bytes")
        print(f"ledger {name}: all-reduce {sent:.0f} B/step = {100 * sent / analytic['none']:.2f}% of fp32; "
              f"step-time spread {metrics.get('ddp/step_time_spread', float('nan')):.3f}; "
              f"noise scale {metrics.get('ddp/noise_scale', float('nan')):.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

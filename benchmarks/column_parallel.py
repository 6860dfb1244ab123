"""Column parallelism vs DDP: bytes per rank and step (full-size AlexNet) and step time (small AlexNet), CPU/gloo.

    .venv/bin/python benchmarks/column_parallel.py [--rounds 5] [--steps 12] [--out runs/column_parallel.json]

Bytes: real Trainer runs of the full-size TwoColumnAlexNet (227x227, 1000 classes) on 2 processes (two columns)
and 4 processes (2x2 hybrid), one training step at the stated global batch on random images; the strategy's
ledger is read and compared with the analytic model; DDP's bytes are counted by a DDP communication hook on a
2-process (and 4-process) run of the full model. Speed: small AlexNet (32x32, width 1, 10 classes), global batch 32,
2 processes, one thread each; column-parallel and DDP alternate in the same processes (``--rounds`` times
``--steps`` steps each, the first 2 of each dropped) and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from traincraft.models.two_column import TwoColumnAlexNet
from traincraft.modules import ImageClassifier
from traincraft.strategies.column_parallel import ColumnParallelStrategy
from traincraft.strategies.column_parallel.byte_model import (
    column_parallel_bytes,
    ddp_bytes,
    exchange_widths,
    parameter_count,
)
from traincraft.strategies.communication import CommunicationLedger

FULL = dict(num_classes=1000, in_channels=3, input_size=227)
SMALL = dict(num_classes=10, in_channels=3, input_size=32)


class CountDDP(Callback):
    """Counts DDP's gradient all-reduce bytes with a communication hook (Lightning registers none on CPU)."""

    def __init__(self) -> None:
        self.ledger = CommunicationLedger()

    def on_fit_start(self, trainer, pl_module):
        ledger, size = self.ledger, trainer.world_size

        def hook(state, bucket):
            ledger.record("all_reduce", bucket.buffer(), size, axis="data")
            work = dist.all_reduce(bucket.buffer().div_(size), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        trainer.strategy.model.register_comm_hook(None, hook)

    def on_train_batch_end(self, trainer, *args):
        self.ledger.end_step()


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        self.times.append(time.perf_counter())


def _loader(config: dict, samples: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    side, channels = config["input_size"], config["in_channels"]
    images = torch.randn(samples, channels, side, side, generator=g)
    labels = torch.randint(0, config["num_classes"], (samples,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch)


def _fit(config: dict, strategy, batch_per_rank: int, steps: int, callbacks: list, width: float = 1.0):
    pl.seed_everything(0)
    clf = ImageClassifier("alexnet_two_column", **config, model_kwargs={"width": width},
                          optimizer=lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9))
    trainer = pl.Trainer(accelerator=os.environ.get("BENCH_ACCELERATOR", "cpu"), devices=int(os.environ["BENCH_WORLD"]),
                         strategy=strategy,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(clf, train_dataloaders=_loader(config, batch_per_rank * steps, batch_per_rank))
    return trainer


def worker_bytes(out: Path, batches: list[int]) -> None:
    """Column-parallel ledger at each global batch, then DDP's counted bytes, on BENCH_WORLD processes."""
    world = int(os.environ["BENCH_WORLD"])
    data_size = world // 2
    result: dict = {"column": {}}
    for batch in batches:
        trainer = _fit(FULL, ColumnParallelStrategy(), batch // data_size, 1, [])
        result["column"][batch] = {f"{a}/{k}": v for (a, k), v in trainer.strategy.ledger.last_step().items()}
    count = CountDDP()
    trainer = _fit(FULL, DDPStrategy(), 1, 1, [count])
    result["ddp"] = {f"{a}/{k}": v for (a, k), v in count.ledger.last_step().items()}
    if trainer.global_rank == 0:
        (out / f"bytes_{world}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def worker_speed(out: Path, rounds: int, steps: int) -> None:
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"column_parallel": [], "ddp": []}
    rounds_median: dict[str, list[float]] = {"column_parallel": [], "ddp": []}
    ledgers = {}
    for _ in range(rounds):  # interleaved, so both see the same load on the shared machine
        for name in ("column_parallel", "ddp"):
            clock = StepTimes()
            count = CountDDP() if name == "ddp" else None
            strategy = ColumnParallelStrategy() if name == "column_parallel" else DDPStrategy()
            # the same global batch of 32: both columns see all 32 images; DDP gives each rank 16
            batch = 32 if name == "column_parallel" else 16
            trainer = _fit(SMALL, strategy, batch, steps, [clock] + ([count] if count else []))
            diffs = [b - a for a, b in zip(clock.times[2:], clock.times[3:], strict=False)]
            times[name].extend(diffs)
            rounds_median[name].append(statistics.median(diffs))
            ledger = trainer.strategy.ledger if name == "column_parallel" else count.ledger
            ledgers[name] = {f"{a}/{k}": v for (a, k), v in ledger.last_step().items()}
    if trainer.global_rank == 0:
        (out / "speed.json").write_text(json.dumps({"times": times, "rounds": rounds_median, "bytes": ledgers}))
    dist.destroy_process_group()


def _launch(part: str, world: int, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "BENCH_WORLD": str(world), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", part, "--work", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{part} worker failed:\n{done.stderr[-4000:]}")


def _wire(figures: dict) -> int:
    return sum(v["wire_bytes"] for v in figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--out", default="runs/column_parallel.json")
    parser.add_argument("--skip", choices=["speed", "bytes"], nargs="*", default=[],
                        help="reuse that part's figures from an earlier run with the same --out")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: NCCL, one device per process (benchmarks/gpu_check.py)")
    parser.add_argument("--worker", choices=["bytes", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error(f"--steps must be at least 4 (the first 2 steps of each fit are dropped); got {args.steps}")
    if args.worker == "bytes":
        return worker_bytes(Path(args.work), args.batches)
    if args.worker == "speed":
        return worker_speed(Path(args.work), args.rounds, args.steps)

    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_ACCELERATOR"] = args.accelerator  # read by the workers
    if "speed" not in args.skip:
        _launch("speed", 2, work, ["--rounds", str(args.rounds), "--steps", str(args.steps)])
    if "bytes" not in args.skip:
        for world in (2, 4):
            _launch("bytes", world, work, ["--batches", *map(str, args.batches)])

    # A part that was skipped reuses an earlier run's figures from the same --out; with none there, that part is
    # left out of the report (the documented speed-only command must work from a fresh clone).
    missing = [name for name in ("bytes_2.json", "bytes_4.json", "speed.json") if not (work / name).exists()]
    for name in missing:
        print(f"{work / name} not found (skipped part, no earlier run with this --out): left out of the report")
    rows = [] if {"bytes_2.json", "bytes_4.json"} & set(missing) else _bytes_rows(work, args.batches)
    summary: dict = {"bytes": rows}
    if "speed.json" not in missing:
        speed = json.loads((work / "speed.json").read_text())
        med = {k: statistics.median(v) for k, v in speed["times"].items()}
        paired = statistics.median(c / d for c, d in zip(*speed["rounds"].values(), strict=True))
        summary["speed"] = {"median_step_s": med, "ratio": med["column_parallel"] / med["ddp"],
                            "paired_round_ratio": paired, "samples": {k: len(v) for k, v in speed["times"].items()},
                            "wire_bytes": {k: _wire(v) for k, v in speed["bytes"].items()}}
    Path(args.out).write_text(json.dumps(summary, indent=1))

    if rows:
        print("| processes | mesh | global batch | column-parallel wire B/rank/step | analytic | accounting error "
              "| DDP wire B/rank/step (counted) | ratio to DDP |")
        print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['mesh']} | {r['global_batch']} | {r['column_wire_bytes']:,} | "
              f"{r['analytic_wire_bytes']:,} | {100 * r['accounting_error']:+.3f}% | {r['ddp_wire_bytes']:,} | "
              f"{r['ratio_to_ddp']:.3f} |")
    if "speed" in summary:
        s, med = summary["speed"], summary["speed"]["median_step_s"]
        print(f"\nsmall AlexNet 32x32, global batch 32, 2 processes: median step column-parallel "
              f"{1000 * med['column_parallel']:.1f} ms, DDP {1000 * med['ddp']:.1f} ms, ratio {s['ratio']:.3f} "
              f"({s['samples']['ddp']} steps each); wire bytes/rank/step {s['wire_bytes']}")


def _bytes_rows(work: Path, batches: list[int]) -> list[dict]:
    with torch.device("meta"):
        full, column = TwoColumnAlexNet(**FULL), TwoColumnAlexNet(**FULL, columns=[0])
    widths, params, column_params = exchange_widths(full), parameter_count(full), parameter_count(column)
    rows = []
    for world in (2, 4):
        measured = json.loads((work / f"bytes_{world}.json").read_text())
        ddp_measured = _wire(measured["ddp"])
        ddp_analytic = ddp_bytes(params, world)["wire_bytes"]
        for batch in batches:
            col = measured["column"][str(batch)]
            analytic = _wire(column_parallel_bytes(widths, batch // (world // 2), column_params=column_params,
                                                   data_parallel_size=world // 2))
            rows.append({"processes": world, "mesh": f"{world // 2} data x 2 columns", "global_batch": batch,
                         "column_wire_bytes": _wire(col), "analytic_wire_bytes": analytic,
                         "accounting_error": _wire(col) / analytic - 1, "ddp_wire_bytes": ddp_measured,
                         "ddp_analytic_wire_bytes": ddp_analytic, "ratio_to_ddp": _wire(col) / ddp_measured})
    return rows

if __name__ == "__main__":
    main()

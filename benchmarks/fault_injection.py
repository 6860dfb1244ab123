"""Fault injection: SIGKILL `traincraft fit` again and again, resume with `--ckpt_path last`, compare the weights.

Each *chain* is one training run (the test's small recipe: digits 8x8, an MLP with 13.5 MB checkpoints, 4 epochs,
best + last checkpoints) killed ``--kills`` times, each kill followed by a resume with ``--ckpt_path last``, and
finally resumed to completion. A kill lands either at a random moment of the run (uniform over 20-100% of an
uninterrupted run's wall time, imports included) or inside a checkpoint write: at the first sign of the k-th save
(k random) on the run directory's filesystem: a new temporary file in the checkpoint directory, a checkpoint file
that shrinks or grows (a copy in progress), or, when TMPDIR is on that filesystem, a new file in TMPDIR.

Layouts: ``same-fs`` (TMPDIR on the run directory's filesystem) and ``cross-fs`` (TMPDIR on tmpfs ``/dev/shm``).
Plugins: ``safe`` (traincraft's default, :class:`~traincraft.checkpoint.SafeCheckpointIO`) and ``stock``
(Lightning's ``TorchCheckpointIO``, through ``--trainer.plugins``).

Counted, per plugin and layout: kills, kills inside a write, kills after which the run had no loadable checkpoint
although one had been saved before (``lost``), chains whose final weights equal the uninterrupted run bit for bit,
chains whose resume failed, bytes left behind in TMPDIR and in the checkpoint directory.

    .venv/bin/python benchmarks/fault_injection.py [--chains 3] [--kills 4] [--stock-chains 2] [--seed 0]
    .venv/bin/python benchmarks/fault_injection.py --writer-kills 20     # a forked writer, both plugins, both layouts
    .venv/bin/python benchmarks/fault_injection.py --overhead 13 240     # save/load seconds, both plugins
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import torch

from traincraft.checkpoint import CheckpointError, SafeCheckpointIO

EXE = Path(sys.executable).parent / "traincraft"
ARGS = [
    "fit", "--trainer.logger=false", "--trainer.deterministic=true", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--model.init_args.model=mlp",
    "--model.init_args.model_kwargs={hidden: [1024, 1024], dropout: 0.2}", "--data.init_args.image_size=8",
    "--trainer.max_epochs=4", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2",
]
PLUGINS = {"safe": [], "stock": ["--trainer.plugins=lightning.fabric.plugins.io.TorchCheckpointIO"]}


def launch(cwd: Path, tmpdir: Path, plugin: str, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "WANDB_MODE": "offline"}
    log = open(cwd / "log.txt", "ab")  # noqa: SIM115 - handed to the child
    command = [str(EXE), *ARGS, *PLUGINS[plugin], *(["--ckpt_path=last"] if resume else [])]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def snapshot(ckpts: Path, tmpdir: Path, watch_tmpdir: bool) -> dict[str, int]:
    files = {}
    for folder, prefix in ((ckpts, ""), (tmpdir, "TMPDIR/")) if watch_tmpdir else ((ckpts, ""),):
        with suppress(FileNotFoundError):  # a folder not created yet, a file renamed away between listing and stat
            for entry in os.scandir(folder):
                with suppress(FileNotFoundError):
                    files[prefix + entry.name] = entry.stat().st_size
    return files


def kill(process: subprocess.Popen, ckpts: Path, tmpdir: Path, watch_tmpdir: bool, write: int, delay: float) -> bool:
    """SIGKILL at the first sign of the ``write``-th save, or after ``delay`` s; False if the run ended first."""
    deadline = time.monotonic() + (300 if write else delay)
    before = snapshot(ckpts, tmpdir, watch_tmpdir)
    saves = 0
    while process.poll() is None and time.monotonic() < deadline:
        if write:
            now = snapshot(ckpts, tmpdir, watch_tmpdir)
            started = [n for n in now if n not in before and (n.endswith(".tmp") or n.startswith("TMPDIR/"))]
            copying = [n for n in now if n.endswith(".ckpt") and n in before and now[n] != before[n]]
            partial = [n for n in now if n.endswith(".ckpt") and n not in before and now[n] == 0]
            saves += bool(started or copying or partial)
            if saves >= write:
                break
            before = now
            time.sleep(0.0002)  # (misses most of the stock plugin's few-ms copies: --writer-kills busy-polls)
        else:
            time.sleep(0.01)
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


def loadable(path: Path) -> bool:
    try:
        SafeCheckpointIO().load_checkpoint(path)  # verifies sealed files, CRC-checks stock ones
    except CheckpointError:
        return False
    return True


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def chain(root: Path, plugin: str, layout: str, kills: int, runtime: float, reference, rng) -> dict[str, int]:
    run = Path(tempfile.mkdtemp(dir=root, prefix=f"{plugin}-{layout}-"))
    tmp_parent = Path("/dev/shm") if layout == "cross-fs" else root
    tmpdir = Path(tempfile.mkdtemp(dir=tmp_parent, prefix="tmpdir-"))
    watch_tmpdir = os.stat(tmpdir).st_dev == os.stat(run).st_dev
    ckpts = run / "runs" / "checkpoints"
    out = dict(kills=0, in_write=0, lost=0, equal=0, resume_failed=0, tmpdir_bytes=0, leftover_bytes=0)
    try:
        for i in range(kills):
            process = launch(run, tmpdir, plugin, resume=i > 0)
            had = (ckpts / "last.ckpt").exists()
            write = rng.randint(1, 8) if rng.random() < 0.6 else 0
            if not kill(process, ckpts, tmpdir, watch_tmpdir, write, rng.uniform(0.2, 1.0) * runtime):
                if process.returncode != 0:
                    out["resume_failed"] += 1
                    return out
                continue
            out["kills"] += 1
            out["in_write"] += bool(write)
            if (had or (ckpts / "last.ckpt").exists()) and not loadable(ckpts / "last.ckpt"):
                out["lost"] += 1
        done = launch(run, tmpdir, plugin, resume=True).wait()
        if done != 0:
            out["resume_failed"] += 1
            return out
        final = weights(ckpts / "last.ckpt")
        out["equal"] += final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
        return out
    finally:
        out["tmpdir_bytes"] = sum(p.stat().st_size for p in tmpdir.rglob("*") if p.is_file())
        out["leftover_bytes"] = sum(p.stat().st_size for p in ckpts.glob(".*.tmp")) if ckpts.is_dir() else 0
        shutil.rmtree(tmpdir, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)


def writer_kills(root: Path, kills: int) -> None:
    """A forked process saves 16 MB checkpoints in a loop and is SIGKILLed at the first sign of a write (as above)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    generations = [{"state_dict": {"w": torch.full((4_000_000,), float(g))}, "generation": g} for g in range(3)]
    print(f"{'plugin':6} {'layout':8} {'kills':>5} {'lost':>4} {'TMPDIR left':>11} {'ckpt dir left':>13}  (left: after "
          "one more clean save)")
    for name, plugin in (("safe", SafeCheckpointIO()), ("stock", TorchCheckpointIO())):
        for layout in ("same-fs", "cross-fs"):
            run = Path(tempfile.mkdtemp(dir=root))
            tmpdir = Path(tempfile.mkdtemp(dir=Path("/dev/shm") if layout == "cross-fs" else root))
            watch_tmpdir = os.stat(tmpdir).st_dev == os.stat(run).st_dev
            path = run / "last.ckpt"
            plugin.save_checkpoint(generations[0], path)
            lost = 0
            for _ in range(kills):
                pid = os.fork()
                if pid == 0:  # the writer runs no torch kernels: an OpenMP pool does not survive fork
                    try:
                        tempfile.tempdir = str(tmpdir)
                        for i in range(1000):
                            plugin.save_checkpoint(generations[1 + i % 2], path)
                    finally:
                        os._exit(0)
                before = snapshot(run, tmpdir, watch_tmpdir)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    now = snapshot(run, tmpdir, watch_tmpdir)
                    if any((n not in before and (n.endswith(".tmp") or n.startswith("TMPDIR/")))
                           or (n.endswith(".ckpt") and n in before and now[n] != before[n]) for n in now):
                        break
                    before = now
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                lost += not loadable(path)
                if not path.exists() or not loadable(path):
                    SafeCheckpointIO().save_checkpoint(generations[0], path)  # the next attempt starts from a good file
            plugin.save_checkpoint(generations[0], path)  # leftovers are measured after one more clean save
            tmp_left = sum(p.stat().st_size for p in tmpdir.rglob("*") if p.is_file())
            dir_left = sum(p.stat().st_size for p in run.glob(".*.tmp"))
            print(f"{name:6} {layout:8} {kills:5d} {lost:4d} {tmp_left / 1e6:9.1f}MB {dir_left / 1e6:11.1f}MB", flush=True)
            shutil.rmtree(tmpdir, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)


def overhead(root: Path, sizes_mb: list[int], repeats: int) -> None:
    """Save and load wall time of both plugins (run directory on ``root``), median of ``repeats``."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    print(f"{'size':>7} {'stock save':>10} {'safe save':>9} {'stock load':>10} {'safe load':>9}  (s, median of {repeats})")
    for size in sizes_mb:
        checkpoint = {"state_dict": {"w": torch.randn(size * 2**20 // 4)}, "epoch": 0}
        row = []
        for action in ("save", "load"):
            for plugin in (TorchCheckpointIO(), SafeCheckpointIO()):
                path = root / f"{type(plugin).__name__}.ckpt"
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    if action == "save":
                        plugin.save_checkpoint(checkpoint, path)
                    else:
                        plugin.load_checkpoint(path, weights_only=True)
                    times.append(time.perf_counter() - t)
                row.append(sorted(times)[len(times) // 2])
        print(f"{size:5d}MB {row[0]:10.3f} {row[1]:9.3f} {row[2]:10.3f} {row[3]:9.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=3, help="chains per layout with traincraft's plugin")
    parser.add_argument("--kills", type=int, default=4, help="kill attempts per chain")
    parser.add_argument("--stock-chains", type=int, default=2, help="chains per layout with Lightning's stock plugin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs-fault-injection"))
    parser.add_argument("--overhead", type=int, nargs="*", metavar="MB",
                        help="instead: time saves and loads of checkpoints of these sizes with both plugins")
    parser.add_argument("--writer-kills", type=int, metavar="N",
                        help="instead: N kills of a forked checkpoint writer per plugin and layout (seconds, not minutes)")
    args = parser.parse_args()
    if args.writer_kills:
        args.root.mkdir(exist_ok=True)
        writer_kills(args.root.resolve(), args.writer_kills)
        shutil.rmtree(args.root, ignore_errors=True)
        return
    if args.overhead is not None:
        args.root.mkdir(exist_ok=True)
        overhead(args.root, args.overhead or [13, 240], repeats=5)
        shutil.rmtree(args.root, ignore_errors=True)
        return
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(".").st_dev:
        raise SystemExit("cross-fs needs /dev/shm on another filesystem than the working directory")
    args.root.mkdir(exist_ok=True)
    root = args.root.resolve()
    rng = random.Random(args.seed)

    straight = Path(tempfile.mkdtemp(dir=root, prefix="straight-"))
    started = time.monotonic()
    assert launch(straight, root, "safe", resume=False).wait() == 0, (straight / "log.txt").read_text()[-2000:]
    runtime = time.monotonic() - started
    reference = weights(straight / "runs" / "checkpoints" / "last.ckpt")
    shutil.rmtree(straight)
    print(f"uninterrupted run: {runtime:.1f} s; {args.kills} kill attempts per chain")

    header = f"{'plugin':6} {'layout':8} {'chains':>6} {'kills':>5} {'in write':>8} {'lost':>4} {'equal':>5} " \
             f"{'resume failed':>13} {'TMPDIR left':>11} {'ckpt dir left':>13}"
    print(header)
    for plugin, n in (("safe", args.chains), ("stock", args.stock_chains)):
        for layout in ("same-fs", "cross-fs"):
            totals: dict[str, int] = {}
            for _ in range(n):
                for key, value in chain(root, plugin, layout, args.kills, runtime, reference, rng).items():
                    totals[key] = totals.get(key, 0) + int(value)
            print(f"{plugin:6} {layout:8} {n:6d} {totals['kills']:5d} {totals['in_write']:8d} {totals['lost']:4d} "
                  f"{totals['equal']:5d} {totals['resume_failed']:13d} {totals['tmpdir_bytes'] / 1e6:9.1f}MB "
                  f"{totals['leftover_bytes'] / 1e6:11.1f}MB", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

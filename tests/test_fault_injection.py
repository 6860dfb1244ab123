"""SIGKILL `traincraft fit` at random moments and inside checkpoint writes; resume with `--ckpt_path last`.

One run is killed three times (inside its 1st and 3rd checkpoint writes, then at a random moment) and
resumed each time; it must end with the weights of an uninterrupted run, bit for bit, and after every kill the
newest checkpoint must verify and load. TMPDIR points at another filesystem (tmpfs) where there is one: the layout
in which Lightning's stock save turns its rename into a copy.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from traincraft.checkpoint import SafeCheckpointIO, verify_checkpoint

EXE = Path(sys.executable).parent / "traincraft"
ARGS = [
    "fit",
    "--trainer.logger=false",
    "--trainer.deterministic=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.model=mlp",
    "--model.init_args.model_kwargs={hidden: [1024, 1024], dropout: 0.2}",  # 13.5 MB checkpoints: writes last ms
    "--data.init_args.image_size=8",
    "--trainer.max_epochs=4",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=2",
]


def _launch(cwd: Path, env: dict[str, str], resume: bool) -> subprocess.Popen:
    log = open(cwd / "log.txt", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([str(EXE), *ARGS, *(["--ckpt_path=last"] if resume else [])], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _temporaries(ckpts: Path) -> set[str]:
    return {n for n in os.listdir(ckpts) if n.endswith(".tmp")} if ckpts.is_dir() else set()


def _kill(process: subprocess.Popen, ckpts: Path, write: int = 0, delay: float = 0.0) -> bool:
    """SIGKILL ``process`` inside its ``write``-th checkpoint write (or after ``delay`` s); False if it ended first."""
    deadline = time.monotonic() + (120 if write else delay)
    seen = set(_temporaries(ckpts))  # a killed predecessor's leftovers
    writes = 0
    while process.poll() is None and time.monotonic() < deadline:
        if write:
            new = _temporaries(ckpts) - seen
            seen |= new
            writes += len(new)
            if writes >= write:
                break
        time.sleep(0.0005 if write else 0.01)
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


@pytest.mark.slow
def test_sigkilled_fits_resume_to_the_uninterrupted_weights(tmp_path):
    env = dict(os.environ)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        env["TMPDIR"] = tempfile.mkdtemp(dir=shm)
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_dir.mkdir()
    killed_dir.mkdir()
    started = time.monotonic()
    assert _launch(straight_dir, env, resume=False).wait(timeout=300) == 0
    runtime = time.monotonic() - started
    straight = torch.load(straight_dir / "runs/checkpoints/last.ckpt", weights_only=True)["state_dict"]

    ckpts = killed_dir / "runs" / "checkpoints"
    rng = random.Random(14)
    kills = in_write = 0
    for i, write in enumerate([1, 3, 0]):  # inside the 1st write, inside the 3rd, at a random moment
        process = _launch(killed_dir, env, resume=i > 0)
        had_checkpoint = (ckpts / "last.ckpt").exists()
        left = _temporaries(ckpts)
        if not _kill(process, ckpts, write=write, delay=rng.uniform(0.3, 0.9) * runtime):
            continue
        kills += 1
        in_write += bool(_temporaries(ckpts) - left)  # the killed save's temporary file is still there
        if had_checkpoint or (ckpts / "last.ckpt").exists():  # a run that had a checkpoint still has a good one
            verify_checkpoint(ckpts / "last.ckpt", require_record=True)
            SafeCheckpointIO().load_checkpoint(ckpts / "last.ckpt")
    assert kills >= 2 and in_write >= 1, (kills, in_write)
    assert _launch(killed_dir, env, resume=True).wait(timeout=300) == 0, (killed_dir / "log.txt").read_text()[-3000:]
    resumed = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    assert not _temporaries(ckpts)  # the completed saves removed what the killed ones left
    if "TMPDIR" in env:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)

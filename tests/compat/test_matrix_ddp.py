"""The compatibility matrix's DDP column: every cell from one 2-process run (gloo, CPU) of _ddp_script.py.

Rank 0's numbers are checked against references recorded on rank 0 (gradients are all-reduced there before the
optimizer step); the curvature, averaged over ranks, against each rank's dense Hessian."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.compat.checks import CHECKS, logged_steps
from tests.compat.matrix import CALLBACKS, MATRIX
from tests.compat.zoo import MODELS

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat-ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.compat._ddp_script", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(m, r): torch.load(out / f"{m}-rank{r}.pt", weights_only=False) for m in MODELS for r in (0, 1)}


def _params():
    for model in MODELS:
        for callback in CALLBACKS:
            cell = MATRIX[(callback, model, "ddp")]
            marks = [pytest.mark.xfail(strict=True, reason=cell.reason)] if cell.status == "xfail" else []
            yield pytest.param(callback, model, marks=marks, id=f"{callback}-{model}-ddp")


def _check_curvature(rank0, rank1):
    rows = logged_steps(rank0, "curvature/")
    assert rank0["probes"] == rank1["probes"] == 2 and len(rows) == 2
    measured = []
    for result in (rank0, rank1):
        (lam_max, lam_min, dense_max, dense_min), = result["dense"]
        assert lam_max == pytest.approx(dense_max, rel=0.02)
        assert lam_min == pytest.approx(dense_min, rel=0.02, abs=0.02 * abs(dense_max))
        measured.append(lam_max)
    assert rows[-1]["curvature/lambda_max"] == pytest.approx(sum(measured) / 2, rel=1e-5)  # the mean over ranks


@pytest.mark.parametrize(("callback", "model"), list(_params()))
def test_ddp_cell(ddp_results, callback, model):
    cell = MATRIX[(callback, model, "ddp")]
    rank0, rank1 = ddp_results[(model, 0)], ddp_results[(model, 1)]
    if cell.status != "ok":
        got = rank0[callback]
        if cell.status == "refused":
            assert got.get("error") == cell.error and re.search(cell.match, got["message"]), got
            assert rank1[callback].get("error") == cell.error  # every rank refuses alike
            return
        assert "error" not in got, got["message"] if "error" in got else ""
        rank0, rank1 = got, rank1[callback]
    else:
        rank0, rank1 = rank0["ok"], rank1["ok"]
        assert "error" not in rank0, rank0.get("message")
    assert (rank0["world"], rank0["rank"], rank1["rank"]) == (2, 0, 1)
    assert rank1["logged"] == []  # only rank 0 logs
    if callback == "CurvatureMonitor":
        _check_curvature(rank0, rank1)
    else:
        CHECKS[callback](rank0)

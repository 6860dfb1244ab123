"""DataDriftMonitor on two real processes (DDP, gloo, CPU): the samples gathered across ranks, and every test
statistic, equal those of the same run in one process."""

from pathlib import Path

import pytest
import torch

from tests.distributed._drift_script import main
from tests.distributed._launch import run_script

SCRIPT = Path(__file__).with_name("_drift_script.py")


def _run_ddp(out: Path) -> dict:
    run_script(SCRIPT.name, out, 2)
    return torch.load(out / "devices2.pt", weights_only=True)


def test_samples_gathered_across_two_ranks_equal_the_single_process_test(tmp_path):
    main(tmp_path, devices=1)  # the same script, in this process
    single, ddp = torch.load(tmp_path / "devices1.pt", weights_only=True), _run_ddp(tmp_path)
    # 200 evenly spaced training images (100 per rank) and all 180 validation images (90 per rank), put back in
    # the order one process sees them
    assert ddp["reference"].shape == (200, 10) and ddp["current"].shape == (180, 10)
    torch.testing.assert_close(ddp["reference"], single["reference"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["current"], single["current"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["ks"], single["ks"])
    assert ddp["metrics"].keys() == single["metrics"].keys() and "drift/mmd_pvalue" in ddp["metrics"]
    for key, value in single["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key

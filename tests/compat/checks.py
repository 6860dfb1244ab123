"""What each cell of the matrix asserts, on the plain data of :func:`tests.compat._cells.run`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from tests.compat._cells import CLIP, LOG_EVERY, STEPPED_BATCHES


def logged_steps(result: dict[str, Any], prefix: str) -> list[dict[str, float]]:
    """One dict per distinct logged step holding keys that start with ``prefix`` (merged over calls)."""
    merged: dict[Any, dict[str, float]] = {}
    for step, metrics in result["logged"]:
        chosen = {k: v for k, v in metrics.items() if k.startswith(prefix)}
        if chosen:
            merged.setdefault(step, {}).update(chosen)
    return list(merged.values())


def logging_batches(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Lightning's logging steps, counted independently: every LOG_EVERY-th batch that stepped."""
    stepped = [b for b in result["batches"] if b["stepped"]]
    assert len(stepped) == STEPPED_BATCHES
    return [b for i, b in enumerate(stepped, start=1) if i % LOG_EVERY == 0]


def expected_logs() -> int:
    return STEPPED_BATCHES // LOG_EVERY


def check_gradient_clipping(result):
    rows = logged_steps(result, "grad/")
    batches = logging_batches(result)
    assert len(rows) == expected_logs(), f"{len(rows)} logs of grad/*, expected {expected_logs()}"
    for row, batch in zip(rows, batches, strict=True):
        norms = batch["grad_norm_of"]  # one per optimizer; keys end in /opt<i> with several
        for index, norm in norms.items():
            tail = "" if len(norms) == 1 else f"/opt{index}"
            assert row[f"grad/norm_pre{tail}"] == pytest.approx(norm, rel=1e-4), (row, norms)
            assert row[f"grad/clip_coef{tail}"] == pytest.approx(min(1.0, CLIP / norm), rel=1e-3)


def check_lr_monitor(result):
    rows = logged_steps(result, "lr-")
    batches = logging_batches(result)
    assert len(rows) == expected_logs(), f"{len(rows)} logs of lr-*, expected {expected_logs()}"
    for row, batch in zip(rows, batches, strict=True):
        rates = sorted(v for k, v in row.items() if not k.endswith("-update_ratio"))
        ratios = sorted(v for k, v in row.items() if k.endswith("-update_ratio"))
        assert rates == pytest.approx(sorted(lr for lrs in batch["lrs"] for lr in lrs), rel=1e-6)
        expected = sorted(r for rs in batch["ratios"] for r in rs)
        assert len(ratios) == len(expected) and ratios == pytest.approx(expected, rel=2e-3), (ratios, expected)


def check_curvature(result):
    rows = logged_steps(result, "curvature/")
    assert result["probes"] == 2 and len(rows) == expected_logs()  # probes after stepped batches 1 and 3
    (measured_max, measured_min, dense_max, dense_min), = result["dense"]
    assert measured_max == pytest.approx(dense_max, rel=0.02)
    assert measured_min == pytest.approx(dense_min, rel=0.02, abs=0.02 * abs(dense_max))
    assert rows[-1]["curvature/lambda_max"] == pytest.approx(measured_max, rel=1e-5)


def check_covariate_shift(result):
    rows = logged_steps(result, "covshift/train/")
    assert len(rows) == expected_logs(), f"{len(rows)} logs of covshift/train/*, expected {expected_logs()}"
    reference = logging_batches(result)[-1]["layer_stats"]
    assert result["covshift"] and set(result["covshift"]) == set(reference)
    for layer, got in result["covshift"].items():
        want = reference[layer]
        torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["std"], want["std"], rtol=1e-4, atol=1e-5)
        assert rows[-1][f"covshift/train/{layer}/mean"] == pytest.approx(float(want["mean"].mean()), rel=1e-4,
                                                                         abs=1e-5)


def check_data_drift(result, rtol=1e-4):
    rows = logged_steps(result, "drift/")
    assert len(rows) == 1  # one validation, at the end of the fit
    drift = result["drift"]
    bf16 = result["setting"] == "bf16-mixed"
    torch.testing.assert_close(drift["current"], drift["recomputed"], rtol=3e-2 if bf16 else rtol,
                               atol=3e-2 if bf16 else 1e-5)
    ref, cur = drift["reference"].numpy(), drift["current"].numpy()
    ks = max(stats.ks_2samp(ref[:, j], cur[:, j]).statistic for j in range(ref.shape[1]))
    assert rows[0]["drift/ks_stat_max"] == pytest.approx(ks, abs=1e-6)
    assert rows[0]["drift/n_current"] == len(cur)


def check_hard_examples(result):
    rows = logged_steps(result, "hard_examples/")
    assert len(rows) == 1  # the end of the (only) training epoch
    seen, ema = result["hard"]["seen"], result["hard"]["loss_ema"]
    losses = torch.cat([b["per_example_loss"] for b in result["batches"]])
    world = result["world"]
    assert int(seen.sum()) == len(losses) * world
    if world == 1:
        np.testing.assert_allclose(np.sort(ema[seen].numpy()), np.sort(losses.numpy()), rtol=1e-5)
    assert rows[0]["hard_examples/seen_fraction"] == pytest.approx(int(seen.sum()) / len(seen))


CHECKS = {
    "GradientClipping": check_gradient_clipping,
    "LearningRateMonitor": check_lr_monitor,
    "CurvatureMonitor": check_curvature,
    "CovariateShiftMonitor": check_covariate_shift,
    "DataDriftMonitor": check_data_drift,
    "HardExampleMining": check_hard_examples,
}

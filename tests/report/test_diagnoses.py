"""Each diagnosis rule on synthetic runs: it fires on the pathology with the right layer and step range, stays
silent just on the healthy side of its threshold, and says nothing when the run did not log its keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from traincraft.report import diagnoses as dx
from traincraft.report._data import RunMetrics, Series
from traincraft.report.diagnoses import diagnose


def run_of(**columns: tuple[np.ndarray, np.ndarray] | np.ndarray) -> RunMetrics:
    """A run from ``key=values`` (logged at steps 0, 10, 20, ...) or ``key=(steps, values)``; ``__`` is ``/``."""
    series = {}
    for name, data in columns.items():
        key = name.replace("__", "/")
        steps, values = data if isinstance(data, tuple) else (np.arange(len(data)) * 10, data)
        series[key] = Series(key, np.asarray(steps, np.int64), np.asarray(values, np.float64))
    return RunMetrics(series, "csv", Path("metrics.csv"))


def with_keys(run: RunMetrics, **extra: np.ndarray) -> RunMetrics:
    return RunMetrics({**run.series, **run_of(**extra).series}, "csv", run.path)


def falling_loss(n: int = 50) -> np.ndarray:
    return 2.3 * np.exp(-np.arange(n) / 15) + 0.1


def flat_loss(n: int = 50) -> np.ndarray:
    return 2.30 - 0.001 * np.arange(n) / n


def only(rule, run: RunMetrics):
    found = rule(run)
    assert len(found) == 1, found
    d = found[0]
    assert d.action and d.theory and d.evidence and 0 <= d.confidence <= 1
    return d


# --- learning rate above the stability threshold ------------------------------------------------------------


def test_stability_fires_on_most_probes_above_the_margin():
    ratio = np.array([2.5, 2.0, 1.8, 2.2])
    run = run_of(curvature__stability_ratio=(np.array([0, 100, 200, 300]), ratio),
                 curvature__eta_lambda=(np.array([0, 100, 200, 300]), ratio * 2),
                 curvature__threshold=(np.array([0, 100, 200, 300]), np.full(4, 2.0)))
    d = only(dx.lr_above_stability, run)
    assert d.steps == (0, 300) and d.value == 2.5 and d.threshold == dx.STABILITY_MARGIN
    assert "5 against the threshold 2" in d.evidence and "Lower the learning rate" in d.action


def test_stability_silent_below_the_margin_or_on_one_early_probe():
    steps = np.array([0, 100, 200, 300])
    assert dx.lr_above_stability(run_of(curvature__stability_ratio=(steps, np.full(4, 1.45)))) == []
    # the catapult: unstable at initialization only
    assert dx.lr_above_stability(run_of(curvature__stability_ratio=(steps, np.array([3.0, 0.8, 0.7, 0.9])))) == []
    assert dx.lr_above_stability(run_of(train__loss_step=flat_loss())) == []


def test_stability_fires_on_one_unstable_probe_when_the_loss_never_falls_after_it():
    steps = np.arange(6) * 20
    probes = dict(curvature__stability_ratio=(steps, np.array([11.0, 0.3, 0.2, 0.2, 0.2, 0.2])),
                  curvature__lambda_max=(steps, np.array([7.0, 0.2, 0.15, 0.16, 0.14, 0.15])))
    d = only(dx.lr_above_stability, run_of(**probes, train__loss_step=(np.arange(120), flat_loss(120))))
    assert d.steps == (0, 0) and "fell only" in d.evidence
    # the catapult: one unstable probe, then the loss falls
    assert dx.lr_above_stability(run_of(**probes, train__loss_step=(np.arange(120), falling_loss(120)))) == []


def test_stability_counts_a_probe_once_however_often_it_is_logged():
    # probes at 0 and 60, each value logged again at every step until the next probe: 1 of 2 probes above
    lam = np.repeat([5.0, 0.4], 60)
    ratio = np.repeat([4.0, 0.3], 60)
    run = run_of(curvature__stability_ratio=(np.arange(120), ratio), curvature__lambda_max=(np.arange(120), lam),
                 train__loss_step=(np.arange(120), falling_loss(120)))
    assert dx.lr_above_stability(run) == []


# --- oscillation ------------------------------------------------------------------------------------------------


def test_oscillation_names_the_group_and_the_step_range():
    cosine = np.full(40, 0.2)
    cosine[10:16] = -0.6
    d = only(dx.oscillation, run_of(**{"lr-SGD-update_cosine": cosine, "lr-SGD/pg2-update_cosine": np.full(40, 0.1)}))
    assert d.layer == "lr-SGD" and d.steps == (100, 150) and d.value == pytest.approx(-0.6)


def test_oscillation_silent_just_above_the_threshold_or_too_briefly():
    assert dx.oscillation(run_of(**{"lr-SGD-update_cosine": np.full(40, -0.28)})) == []
    brief = np.full(40, 0.2)
    brief[[5, 6, 20, 21]] = -0.9  # never OSCILLATION_LOGS consecutive logs
    assert dx.oscillation(run_of(**{"lr-SGD-update_cosine": brief})) == []


# --- learning rate too low ----------------------------------------------------------------------------------------


def test_lr_too_low_needs_tiny_updates_and_a_flat_loss():
    run = run_of(**{"lr-SGD-update_ratio": np.full(50, 1e-6)}, train__loss_step=flat_loss())
    d = only(dx.lr_too_low, run)
    assert d.layer == "lr-SGD" and d.value == pytest.approx(1e-6) and "Raise" in d.action
    assert "1e+03×" in d.action  # to ‖Δθ‖/‖θ‖ ≈ 1e-3


def test_lr_too_low_silent_when_the_loss_falls_or_updates_are_healthy():
    assert dx.lr_too_low(run_of(**{"lr-SGD-update_ratio": np.full(50, 1e-6)}, train__loss_step=falling_loss())) == []
    assert dx.lr_too_low(run_of(**{"lr-SGD-update_ratio": np.full(50, 1.2e-4)}, train__loss_step=flat_loss())) == []
    assert dx.lr_too_low(run_of(**{"lr-SGD-update_ratio": np.full(50, 1e-6)})) == []  # no loss: no verdict


# --- gradient cliff -----------------------------------------------------------------------------------------------


def cliff_run(spike: float, jump: float) -> RunMetrics:
    norm, loss = np.ones(60), falling_loss(60)
    norm[30] = spike
    loss[31] = loss[29] * jump
    return run_of(grad__norm_pre=norm, train__loss_step=loss)


def test_cliff_fires_on_a_spike_with_a_loss_jump_and_proposes_a_threshold():
    d = only(dx.gradient_cliff, cliff_run(spike=50.0, jump=5.0))
    assert d.steps == (300, 300) and d.value == pytest.approx(50.0)
    assert 'GradientClipping(mode="norm", threshold=1)' in d.action


def test_cliff_silent_below_the_factor_or_without_a_loss_jump():
    assert dx.gradient_cliff(cliff_run(spike=9.0, jump=5.0)) == []
    assert dx.gradient_cliff(cliff_run(spike=50.0, jump=1.2)) == []
    # late in a fit: a noisy loss of 0.02 doubling is no lost progress
    norm, loss = np.ones(60), np.full(60, 0.02)
    loss[:3] = 2.3
    norm[30], loss[31] = 50.0, 0.06
    assert dx.gradient_cliff(run_of(grad__norm_pre=norm, train__loss_step=loss)) == []
    assert dx.gradient_cliff(run_of(train__loss_step=falling_loss())) == []


def test_cliff_fires_on_skipped_nonfinite_steps_and_knows_clipping_is_on():
    skipped = np.zeros(20)
    skipped[12:] = 2
    run = run_of(grad__norm_pre=np.ones(20), grad__skipped_steps=skipped, grad__threshold=np.full(20, 5.0))
    d = only(dx.gradient_cliff, run)
    assert d.steps == (120, 120) and "2 optimizer step(s) skipped" in d.evidence
    assert "Lower GradientClipping's threshold from 5" in d.action


# --- vanishing gradients ------------------------------------------------------------------------------------------


def layer_norms(first: float) -> dict[str, np.ndarray]:
    depth = np.geomspace(first, 1.0, 5)
    return {f"grad__norm__model.blocks.{i}.linear.weight": np.full(20, depth[i]) for i in range(5)}


def test_vanishing_names_the_earliest_layer():
    slope = np.full(20, np.log(1e-5) / 4)
    d = only(dx.vanishing_gradients, run_of(**layer_norms(1e-5), grad__depth_slope=slope))
    assert d.layer == "model.blocks.0.linear.weight" and d.value == pytest.approx(1e-5)
    assert d.steps == (100, 190) and '"blocks.0.linear.*": 10.0' in d.action  # the last half, as read


def test_vanishing_silent_just_above_the_ratio_and_needs_both_signals_to_agree():
    assert dx.vanishing_gradients(run_of(**layer_norms(2e-3))) == []
    assert dx.vanishing_gradients(run_of(**layer_norms(1e-5), grad__depth_slope=np.full(20, -0.3))) == []
    slope_only = only(dx.vanishing_gradients, run_of(grad__depth_slope=np.full(20, -1.5)))
    assert slope_only.layer is None and slope_only.threshold == dx.DEPTH_SLOPE_VANISHING
    assert dx.vanishing_gradients(run_of(grad__depth_slope=np.full(20, -0.9))) == []


# --- dead and saturated units -------------------------------------------------------------------------------------


def test_dead_units_name_the_layer_from_the_last_half():
    dead = np.concatenate([np.full(10, 0.5), np.full(10, 0.97)])
    run = run_of(**{"covshift/train/model.blocks.1.act/dead_frac": dead,
                    "covshift/train/model.blocks.0.act/dead_frac": np.full(20, 0.5)})
    d = only(dx.dead_units, run)
    assert d.layer == "model.blocks.1.act" and d.steps == (100, 190) and d.value == pytest.approx(0.97)


def test_dead_units_silent_below_the_fraction_or_after_recovery():
    assert dx.dead_units(run_of(**{"covshift/train/a/dead_frac": np.full(20, 0.93)})) == []
    recovered = np.concatenate([np.full(10, 0.99), np.full(10, 0.55)])
    assert dx.dead_units(run_of(**{"covshift/train/a/dead_frac": recovered})) == []
    assert dx.dead_units(run_of(**{"covshift/val/a/dead_frac": np.full(20, 0.99)})) == []  # training only


def test_saturated_units_name_the_layer():
    run = run_of(**{"covshift/train/model.blocks.0.act/sat_frac": np.full(20, 0.8)})
    assert only(dx.saturated_units, run).layer == "model.blocks.0.act"
    assert dx.saturated_units(run_of(**{"covshift/train/x/sat_frac": np.full(20, 0.45)})) == []


# --- drift, straggler, saddle, overfitting ----------------------------------------------------------------------


def test_drift_needs_consecutive_checks():
    steps = np.array([40, 80, 120, 160])
    run = run_of(drift__detected=(steps, np.array([0, 1, 1, 1.0])),
                 drift__ks_pvalue_min=(steps, np.array([0.3, 1e-8, 1e-9, 1e-7])))
    d = only(dx.data_drift, run)
    assert d.steps == (80, 160) and "1e-07" in d.evidence
    assert dx.data_drift(run_of(drift__detected=(steps, np.array([1, 0, 1, 0.0])))) == []


def test_straggler_on_the_median_spread():
    d = only(dx.straggler, run_of(ddp__step_time_spread=np.full(10, 2.2), ddp__step_time_max=np.full(10, 0.05)))
    assert d.value == pytest.approx(2.2) and "50 ms" in d.evidence
    assert dx.straggler(run_of(ddp__step_time_spread=np.full(10, 1.28))) == []


def test_saddle_only_on_a_plateau():
    steps = np.array([0, 200, 400])
    flags = (steps, np.ones(3))
    assert only(dx.saddle, run_of(curvature__saddle=flags, train__loss_step=flat_loss())).steps == (0, 400)
    assert dx.saddle(run_of(curvature__saddle=flags, train__loss_step=falling_loss())) == []


def test_overfitting_when_validation_rises_and_training_falls():
    val = np.array([1.0, 0.6, 0.4, 0.42, 0.47, 0.52, 0.55])
    run = run_of(val__loss=(np.arange(7) * 70, val), train__loss_step=falling_loss())
    d = only(dx.overfitting, run)
    assert d.steps == (140, 420) and d.severity == "warning"
    calm = np.array([1.0, 0.6, 0.4, 0.41, 0.42, 0.42, 0.43])
    assert dx.overfitting(run_of(val__loss=(np.arange(7) * 70, calm), train__loss_step=falling_loss())) == []


# --- diagnose -----------------------------------------------------------------------------------------------------


def test_diagnose_a_healthy_run_is_empty():
    run = run_of(**{"lr-SGD-update_ratio": np.full(50, 1e-3), "lr-SGD-update_cosine": np.full(50, 0.1),
                    "covshift/train/a/dead_frac": np.full(50, 0.5)},
                 train__loss_step=falling_loss(), grad__norm_pre=np.ones(50), grad__depth_slope=np.full(50, -0.1),
                 ddp__step_time_spread=np.full(50, 1.05), val__loss=(np.arange(5) * 100, np.linspace(1, 0.3, 5)))
    assert diagnose(run) == []
    assert diagnose(RunMetrics({}, "csv", Path("."))) == []


def test_diagnose_orders_problems_first_then_confidence():
    val = np.array([1.0, 0.6, 0.4, 0.42, 0.47, 0.52, 0.9])
    run = run_of(val__loss=(np.arange(7) * 70, val), train__loss_step=falling_loss(),
                 ddp__step_time_spread=np.full(10, 1.35), **{"covshift/train/a/sat_frac": np.full(20, 0.99)})
    found = diagnose(run)
    assert [d.rule for d in found] == ["saturated_units", "straggler", "overfitting"]
    assert found[0].confidence >= found[1].confidence


def test_diagnose_rejects_what_is_not_a_run():
    with pytest.raises(TypeError, match="read_run"):
        diagnose({"train/loss": [1, 2]})

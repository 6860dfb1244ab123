"""Panels and report.html: what a run logged is drawn, what it did not is named with its callback, and the page
is self-contained (no URL, no script) and escapes what comes from the run."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import tiny_trainer
from traincraft.callbacks import GradientClipping, LearningRateMonitor
from traincraft.report import Diagnosis, Report, RunMetrics, Series, build_report
from traincraft.report.html import render_html
from traincraft.report.panels import PANELS, draw_panels, reduce_for_plot

_PNG = b"\x89PNG\r\n\x1a\n"


class Mlp(LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _run(steps: int = 200, **keys) -> RunMetrics:
    x = np.arange(steps, dtype=np.int64)
    series = {k: Series(k, x.copy(), np.asarray(f(x), dtype=np.float64)) for k, f in keys.items()}
    return RunMetrics(series, "csv", Path("synthetic/metrics.csv"))


def _all_signals() -> RunMetrics:
    def ramp(x):
        return 1.0 + x / 100

    keys = {"train/loss": lambda x: 2 * np.exp(-x / 50), "val/acc": lambda x: 1 - np.exp(-x / 50),
            "val/acc_top5_epoch": lambda x: 1 - np.exp(-x / 20),
            "lr-SGD": lambda x: np.full(len(x), 0.1), "lr-SGD-update_ratio": lambda x: 1e-3 + 0 * x,
            "lr-SGD-update_cosine": np.sin, "grad/norm_pre": ramp, "grad/norm_post": ramp,
            "grad/clipped_frac": lambda x: x % 2, "grad/skipped_steps": lambda x: x // 50,
            "grad/norm/model.layers.2.weight": ramp, "grad/norm/model.layers.10.weight": ramp,
            "grad/depth_slope": np.cos, "curvature/eta_lambda": ramp, "curvature/lambda_max": ramp,
            "curvature/lambda_min": lambda x: -ramp(x), "drift/ks_pvalue_min": lambda x: 0.5 + 0 * x,
            "comm/bytes": lambda x: 4e6 + 0 * x, "ddp/step_time_spread": ramp, "ddp/noise_scale": ramp,
            "train/samples_per_sec": ramp, "train|device|mfu": lambda x: 0.4 + 0 * x}
    for layer in ("model.0.act", "model.1.act"):
        for stat in ("mean", "std", "dead_frac", "sat_frac"):
            keys[f"covshift/train/{layer}/{stat}"] = lambda x: 0.3 + 0 * x
    keys["covshift/train/model.0.norm/bn_var_ratio"] = lambda x: 1 + np.sin(x) / 2
    return _run(**keys)


@pytest.fixture(scope="module")
def drawn() -> tuple[RunMetrics, list, list[str]]:
    """Every panel of a run that logged every signal, drawn once for the tests of this file."""
    run = _all_signals()
    return run, *draw_panels(run)


def test_every_panel_draws_from_its_keys(drawn):
    run, panels, left_out = drawn
    assert [p.name for p in panels] == ["loss_accuracy", "learning_rate", "gradients", "depth_profile", "sharpness",
                                        "activations", "dead_saturated", "drift", "distributed", "throughput"]
    assert left_out == []
    for panel in panels:
        assert panel.png.startswith(_PNG) and len(panel.png) > 5000, panel
        assert panel.keys and set(panel.keys) <= set(run.series), panel
    by_name = {p.name: p for p in panels}
    # the depth axis follows the layer numbers, not the text: layers.2 comes before layers.10
    assert by_name["depth_profile"].keys[:2] == ("grad/norm/model.layers.2.weight", "grad/norm/model.layers.10.weight")
    assert "covshift/train/model.1.act/sat_frac" in by_name["dead_saturated"].keys
    assert "covshift/train/model.0.norm/bn_var_ratio" in by_name["activations"].keys
    assert by_name["throughput"].keys == ("train/samples_per_sec", "train|device|mfu")
    assert by_name["loss_accuracy"].keys == ("train/loss", "val/acc", "val/acc_top5_epoch")


def test_a_run_without_signals_names_the_callback_for_each_panel():
    panels, left_out = draw_panels(_run(**{"epoch": lambda x: x // 10}))
    assert panels == [] and len(left_out) == len(PANELS)
    for line, callback in zip(left_out, ["ImageClassifier", "LearningRateMonitor(", "GradientClipping(",
                                         "GradientClipping(log_layer_norms=True", "CurvatureMonitor(",
                                         "CovariateShiftMonitor(", "CovariateShiftMonitor(", "DataDriftMonitor(",
                                         "DataParallelStrategy(", "ThroughputMonitor("], strict=True):
        assert line.startswith("left out: ") and callback in line, line


def test_a_real_fit_with_clipping_and_lr_monitor_draws_their_panels_and_names_the_rest():
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    callbacks = [GradientClipping(threshold=0.5, log_layer_norms=True, log_depth_profile=True),
                 LearningRateMonitor(log_update_ratio=True, log_oscillation=True)]
    trainer = tiny_trainer(max_epochs=2, logger=CSVLogger("runs", name="csv"), callbacks=callbacks,
                           log_every_n_steps=2)
    trainer.fit(Mlp(), DataLoader(data, batch_size=8))
    report = build_report("runs", out_dir="report")
    names = {p.name: p for p in report.panels}
    assert list(names) == ["loss_accuracy", "learning_rate", "gradients", "depth_profile"]
    assert {"lr-SGD", "lr-SGD-update_ratio", "lr-SGD-update_cosine"} <= set(names["learning_rate"].keys)
    assert {"grad/norm_pre", "grad/norm_post", "grad/clipped_frac", "grad/skipped_steps"} <= set(
        names["gradients"].keys)
    assert names["depth_profile"].keys[:2] == ("grad/norm/model.0.weight", "grad/norm/model.2.weight")
    assert [line.split(" — ")[0] for line in report.left_out] == [
        "left out: sharpness", "left out: activation statistics", "left out: dead and saturated units",
        "left out: drift", "left out: distributed", "left out: throughput"]
    for name in names:
        assert Path(f"report/panels/{name}.png").read_bytes() == names[name].png
    saved = json.loads(Path("report/diagnoses.json").read_text())
    assert saved["source"] == "csv" and saved["run"].endswith("metrics.csv") and saved["left_out"] == report.left_out


def test_reduction_keeps_each_bins_extremes_at_their_steps():
    rng = np.random.default_rng(0)
    steps = np.sort(rng.choice(100_000, size=50_000, replace=False))
    values = rng.normal(size=steps.size)
    values[1234] = 1e6
    values[777] = np.nan
    s, v = reduce_for_plot(steps, values, bins=100)
    assert len(s) <= 200 and np.all(np.diff(s) >= 0) and v.max() == 1e6 and np.isfinite(v).all()
    keep = np.isfinite(values)
    edges = np.linspace(steps[keep][0], steps[keep][-1] + 1, 101)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):  # reference: brute force per bin
        inside = keep & (steps >= lo) & (steps < hi)
        if inside.any():
            mine = (s >= lo) & (s < hi)
            assert v[mine].min() == values[inside].min() and v[mine].max() == values[inside].max()
            assert set(s[mine]) <= set(steps[inside])
    short = np.arange(10)
    assert reduce_for_plot(short, short * 1.0)[0].tolist() == short.tolist()


def _diagnosis(rule: str, severity: str, confidence: float) -> Diagnosis:
    return Diagnosis(rule=rule, title=f"{rule} <b>title</b>", severity=severity, confidence=confidence,
                     evidence="grad/norm_pre reached 1e3 > 10 × median", action="GradientClipping(threshold=1.0)",
                     theory="Pascanu et al. 2013", steps=(10, 40), keys=("grad/norm_pre",), layer="model.0",
                     value=1000.0, threshold=10.0)


def test_html_is_self_contained_escaped_and_lists_diagnoses_worst_first(drawn):
    run, panels, _ = drawn
    hostile = '<img src="x.png" onerror=alert(1)>'
    run = RunMetrics({**run.series, hostile: Series(hostile, np.arange(3), np.ones(3))}, run.source,
                     Path("runs/<b>&/metrics.csv"), {"covshift/train/model.0.act/hist": "histogram"})
    diagnoses = [_diagnosis("mild", "info", 0.9), _diagnosis("bad", "problem", 0.6), _diagnosis("meh", "warning", 1)]
    page = render_html(run, diagnoses, panels, ["left out: x — add <Y()>"])
    assert "http://" not in page and "https://" not in page and "<script" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(panels) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert [base64.b64decode(s.split(",", 1)[1]) for s in sources] == [p.png for p in panels]
    assert "&lt;img src=&quot;x.png&quot;" in page and "&lt;b&gt;title&lt;/b&gt;" in page and "&lt;Y()&gt;" in page
    assert "runs/&lt;b&gt;&amp;/metrics.csv" in page and "<b>" not in page
    assert [page.index(f'id="diag-{r}"') for r in ("bad", "meh", "mild")] == sorted(
        page.index(f'id="diag-{r}"') for r in ("bad", "meh", "mild"))
    # diagnoses, then panels, then the left-out lines, then the run's keys
    assert page.index("Diagnoses") < page.index("<figure") < page.index("Left out") < page.index("&lt;img src")
    for text in ("steps 10–40", "model.0", "against threshold 10", "Pascanu et al. 2013", "60%", "histogram"):
        assert text in page


def test_report_writes_page_panels_and_diagnoses_json_and_summarises(tmp_path, drawn):
    run, panels, left_out = drawn
    report = Report(run, [_diagnosis("bad", "problem", 0.75)], panels, left_out)
    page = report.write(tmp_path / "out")
    assert page == tmp_path / "out" / "report.html" and page.read_text(encoding="utf-8") == report.html()
    assert sorted(p.name for p in (tmp_path / "out/panels").iterdir()) == sorted(f"{p.name}.png" for p in panels)
    saved = json.loads((tmp_path / "out/diagnoses.json").read_text())
    assert saved["diagnoses"][0]["rule"] == "bad" and saved["diagnoses"][0]["steps"] == [10, 40]
    assert report.summary().startswith("PROBLEM  bad <b>title</b> [steps 10-40] [layer model.0] (75%): Gradient")
    Report(run, [], panels[:2], left_out).write(tmp_path / "out")  # a rewrite with fewer panels leaves no stale ones
    assert sorted(p.name for p in (tmp_path / "out/panels").iterdir()) == sorted(f"{p.name}.png" for p in panels[:2])
    healthy = Report(run, [], panels, left_out)
    assert "no diagnosis" in healthy.summary() and "No diagnosis" in healthy.html()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        report.write(tmp_path / "file")


def test_groups_and_optimizers_are_told_apart_by_lightnings_names():
    from traincraft.report.panels import gradients, lr_groups

    keys = ["lr-Adam", "lr-Adam-momentum", "lr-Adam-1", "lr-Adam-1-momentum", "lr-Adam-1-update_ratio",
            "lr-SGD/pg1", "lr-SGD/pg1-beta1", "lr-SGD/pg10", "lr-SGD/pg2"]
    run = _run(**{k: (lambda x: 0.1 + 0 * x) for k in keys})
    assert lr_groups(run) == ["lr-Adam", "lr-Adam-1", "lr-SGD/pg1", "lr-SGD/pg2", "lr-SGD/pg10"]
    run = _run(**{k: (lambda x: 1.0 + x) for k in ("grad/norm_pre/opt0", "grad/norm_pre/opt1", "grad/clipped_frac/opt1")})
    assert gradients(run).keys == ("grad/norm_pre/opt0", "grad/norm_pre/opt1", "grad/clipped_frac/opt1")

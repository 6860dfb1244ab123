"""Panels of the data and the machines: train/validation drift, distributed training, throughput."""

from __future__ import annotations

import re

from traincraft.report._data import RunMetrics
from traincraft.report._plotting import Panel, _natural, _stacked


def drift(run: RunMetrics) -> Panel | None:
    """Drift test p-values against alpha, and the test statistics (``DataDriftMonitor``)."""
    return _stacked(run, "drift", "Train/validation input drift", [
        ("p-values (drift when below alpha)", ["drift/ks_pvalue_min", "drift/mmd_pvalue"]),
        ("statistics", ["drift/ks_stat_max", "drift/mmd2", "drift/ks_features", "drift/detected"]),
    ], hlines={"p-values (drift when below alpha)": (0.05, "alpha = 0.05 (the default)")},
        logs={"statistics": False})


def distributed(run: RunMetrics) -> Panel | None:
    """Bytes per step, straggler spread and gradient noise scale (``DataParallelStrategy``'s monitor)."""
    return _stacked(run, "distributed", "Distributed training: communication, stragglers, noise scale", [
        ("bytes per optimizer step", ["comm/bytes", "comm/wire_bytes", *run.matching("comm/data/*"),
                                      *run.matching("comm/batchnorm/*")]),
        ("step time over ranks (s)", ["ddp/step_time_median", "ddp/step_time_max"]),
        ("straggler spread: slowest / median rank (1 balanced)", ["ddp/step_time_spread"]),
        ("gradient noise scale B_simple (critical batch size)", ["ddp/noise_scale"]),
    ], hlines={"straggler spread: slowest / median rank (1 balanced)": (1.0, "balanced")},
        logs={"straggler spread: slowest / median rank (1 balanced)": False})


def _throughput_keys(run: RunMetrics) -> list[str]:
    return sorted((k for k in run.series if "per_sec" in k or "throughput" in k or re.search(r"(^|[/|])mfu$", k)),
                  key=_natural)


def throughput(run: RunMetrics) -> Panel | None:
    """Samples/batches per second, FLOP/s and MFU (Lightning's ``ThroughputMonitor``, or any ``*per_sec*`` key)."""
    keys = _throughput_keys(run)
    flops = [k for k in keys if "flop" in k]
    mfu = [k for k in keys if re.search(r"(^|[/|])mfu$", k)]
    rate = [k for k in keys if k not in flops and k not in mfu]
    return _stacked(run, "throughput", "Throughput", [("samples, batches or items per second", rate),
                                                      ("FLOP per second", flops), ("model FLOP utilisation", mfu)])

"""Every script in benchmarks/ runs at its smallest setting, so the commands in docs/benchmarks.md cannot rot.

Each script runs in this process (its imports are shared, so a run costs its own work only) with toy arguments,
and the figures it prints are read back: a table row with numbers, not merely an exit code. The figures of a toy
run mean nothing; their presence and their ranges do. The GPU check's plan and its answer on a machine without
CUDA are tested here too (they are cheap and not marked slow).
"""

from __future__ import annotations

import json
import logging
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"(-?[\d.,]+)"

# script: (smallest arguments, patterns that must match the output, each capturing numbers checked below)
SMOKE: dict[str, tuple[list[str], list[str]]] = {
    "augmentation.py": (["--repeats", "1"],
                        [rf"\| cifar \| 256×3×32×32 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
                         rf"\| alexnet \| 64×3×224×224 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|"]),
    "class_interleaving.py": (["--seeds", "0", "--epochs", "2"],
                              [rf"\| digits 10% \(n=126\) \| interleaved \(stratified\) \| {NUMBER} ± {NUMBER}% \|",
                               rf"\| imbalanced \(n=514\) \| uniform \| {NUMBER} ± {NUMBER}% \|"]),
    "column_parallel.py": (["--rounds", "1", "--steps", "4", "--skip", "bytes", "--out", "runs/cp.json"],
                           [r"bytes_2.json not found",
                            rf"median step column-parallel {NUMBER} ms, DDP {NUMBER} ms, ratio {NUMBER}"]),
    "covariate_shift.py": (["--steps", "55", "--repeats", "1"],
                           [rf"\| with monitor \| {NUMBER} \|", rf"amortized over 50 steps: \+?{NUMBER}%"]),
    "curvature.py": (["--repeats", "1", "--fit-steps", "6", "--skip", "accuracy"],
                     [rf"\| convnet \| {NUMBER} ms \| {NUMBER} ms \(12 products\) \| {NUMBER} steps \|",
                      rf"\| lm \| {NUMBER} s \| {NUMBER} ms \| 1 \|"]),
    "data_parallel.py": (["--repeats", "1", "--steps", "6", "--warmup", "2", "--variants", "ddp", "traincraft_ddp"],
                         [rf"traincraft_ddp\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
                          rf"ledger traincraft_ddp: all-reduce {NUMBER} B/step = {NUMBER}% of fp32"]),
    "default_recipe.py": (["--seeds", "0", "--max-epochs", "1"],
                          [rf"\| 0 \| {NUMBER}% \| {NUMBER} \| {NUMBER} \|"]),
    "digits_augmentation.py": (["--seeds", "0", "--epochs", "1"],
                               [rf"\| default \| {NUMBER}% \| {NUMBER}% \|", rf"\| none \| {NUMBER}% \| {NUMBER}% \|"]),
    "fault_injection.py": (["--writer-kills", "1"], [rf"safe\s+same-fs\s+1\s+0\s+{NUMBER}MB"]),
    "gradient_clipping.py": (["--rounds", "1", "--steps", "6", "--reps", "2"],
                             [rf"\| GradientClipping norm, default \(auto: sync guard on CPU\), AdamW \| {NUMBER} \| "
                              rf"{NUMBER} \|", rf"\| {NUMBER} \| {NUMBER} \| {NUMBER} \|\n*\Z"]),
    "hard_examples.py": (["--seeds", "0", "--epochs", "1"],
                         [r"\| uniform \| 10\.0% \|", rf"\| capped \| {NUMBER}% \| {NUMBER}% \|"]),
    "lr_monitor.py": (["--repeats", "2", "--fits", "1", "--steps", "8", "--reference-iterations", "10"],
                      [rf"\| per-step extras, optimizer hooks alone \| {NUMBER} ms \| {NUMBER} ms \|",
                       rf"vs 10 cold iterations: relative error {NUMBER}"]),
    "mmd.py": (["--n", "64", "--dims", "4", "--permutations", "20", "--repeats", "1"], [rf"speed-up: {NUMBER}x"]),
    "nonfinite_guard.py": (["--repeats", "1", "--steps", "8"],
                           [rf"adamw-fused\s+guard\s+{NUMBER} ms/step, none\s+{NUMBER} ms/step, ratio {NUMBER}"]),
    "report_speed.py": (["--steps", "2000", "--repeats", "1"],
                        [rf"\| 2,000 \| 10 \| 205 \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|"]),
    "pathologies.py": (["--only", "dead_relu"],
                       [r"\| dead_relu \| .* \| dead_units model\.blocks\.1\.act steps [\d–-]+ \| detected \| [\d.]+ \|",
                        r"detected/induced: 1/1; false alarms/healthy runs: 0/0"]),
    "lr_suggestion.py": (["--recipes", "digits_convnet", "--seeds", "0", "--epochs", "1", "--lr-find-steps", "5",
                          "--iterations", "2"],
                         [rf"\| digits_convnet \| 0 \| 0\.003: {NUMBER}% \| .* \| {NUMBER}(?:e[-+]?\d+)? \({NUMBER}(?:e[-+]?\d+)?\), "
                          rf"{NUMBER}%, {NUMBER} \|"]),
    "gpu_check.py": (["--device", "cpu", "--tiny", "--out", "runs/gpu_check"],
                     [rf"\| presets \| ok \| cifar images/s \(batch 8, 32x32 uint8 in\) \| {NUMBER} \|",
                      r"\| fp16-guard \| ok \| poisoned batches \| 2 \|", r"\| ddp-bytes \| skipped \|"]),
}


def _run(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *argv])
    # scripts set one torch thread and quiet Lightning's loggers: later tests in this process must not inherit that
    threads = torch.get_num_threads()
    levels = {name: log.level for name, log in logging.root.manager.loggerDict.items()
              if isinstance(log, logging.Logger)}
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    except SystemExit as stop:  # gpu_check exits with its status
        assert stop.code in (0, None), f"{script} exited with {stop.code}"
    finally:
        torch.set_num_threads(threads)
        for name, log in logging.root.manager.loggerDict.items():
            if isinstance(log, logging.Logger):
                log.setLevel(levels.get(name, logging.NOTSET))


def test_every_benchmark_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.name for p in BENCHMARKS.glob("*.py")), (
        "add the new benchmark's smallest invocation to SMOKE")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_its_smallest_setting(script, monkeypatch, capfd):
    argv, patterns = SMOKE[script]
    _run(script, argv, monkeypatch)
    out = capfd.readouterr().out
    for pattern in patterns:
        match = re.search(pattern, out)
        assert match, f"{script}: no line matches {pattern!r} in:\n{out[-3000:]}"
        for value in match.groups():
            number = float(value.replace(",", ""))
            assert number == number and abs(number) < 1e12, f"{script}: {value} in {match.group(0)!r}"


@pytest.mark.slow
def test_the_gpu_check_rehearsal_writes_its_json_and_table(monkeypatch, capfd):
    _run("gpu_check.py", ["--device", "cpu", "--tiny", "--only", "presets", "fp16-guard", "--out", "gc"],
         monkeypatch)
    report = json.loads(Path("gc/gpu_check.json").read_text())
    rows = {row["check"]: row for row in report["checks"]}
    assert list(rows) == ["presets", "fp16-guard"] and report["tiny"] and report["within_budget"]
    assert all(rate > 0 for rate in rows["presets"]["figures"].values())
    guard = rows["fp16-guard"]["figures"]
    # GradientClipping undoes both poisoned steps (BatchNorm statistics included); without it the overflowing
    # forward passes leave non-finite running statistics although the GradScaler skips the optimizer step
    assert guard["left bit-identical"] == 2
    assert guard["left bit-identical without GradientClipping (BatchNorm sees the overflow)"] == 0
    assert guard["step time with GradientClipping / without"] > 0
    assert "| presets | ok |" in Path("gc/gpu_check.md").read_text()


def test_the_gpu_check_dry_run_lists_every_check(monkeypatch, capfd):
    checks = runpy.run_path(str(BENCHMARKS / "gpu_check.py"))["CHECKS"]
    _run("gpu_check.py", ["--dry-run"], monkeypatch)
    out = capfd.readouterr().out
    assert re.search(r"would run 7 checks \(budget (\d+) s of 480 s\)", out)
    assert sum(budget for _, budget, _, _ in checks.values()) <= 480
    assert not Path("runs").exists()  # a dry run writes nothing
    for name in ("gpu-tests", "presets", "datamodule", "augment-share", "fp16-guard", "ddp-bytes", "column-parallel"):
        assert re.search(rf"^{name} +\d+ s  [12] device\(s\)", out, re.M), name
    # the commands it would launch name scripts that exist and options those scripts accept
    for command in re.findall(r"python (benchmarks/\S+\.py) (.*)$", out, re.M):
        source = (BENCHMARKS.parent / command[0]).read_text()
        for flag in re.findall(r"(--[a-z-]+)", command[1]):
            assert f'"{flag}"' in source, f"{command[0]} has no option {flag}"
    assert "-m gpu tests" in out


def test_the_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(monkeypatch, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _run("gpu_check.py", [], monkeypatch)
    out = capfd.readouterr().out.strip().splitlines()
    assert out == ["gpu_check: no CUDA device on this machine; nothing measured (run it where `nvidia-smi` lists a "
                   "GPU)."]
    assert not Path("runs").exists()


def test_the_gpu_rows_of_the_benchmarks_page_name_every_check_and_how_to_measure_it():
    checks = runpy.run_path(str(BENCHMARKS / "gpu_check.py"))["CHECKS"]
    text = (BENCHMARKS.parent / "docs" / "benchmarks.md").read_text()
    section = text[text.index("## GPU figures (`make gpu-check`)"):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else None]
    rows = dict(re.findall(r"^\| `([\w-]+)` \|.*\| ([^|]+) \|$", section, re.M))
    assert sorted(rows) == sorted(checks), f"docs/benchmarks.md's GPU table lists {sorted(rows)}, gpu_check {sorted(checks)}"
    # a figure is either a measured number or plainly marked, and the page says how to measure them
    assert all(v.strip() == "not measured" or re.search(r"\d", v) for v in rows.values()), rows
    assert "make gpu-check" in section and "gpu_check.json" in section

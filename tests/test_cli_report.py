"""`traincraft report RUN`: a real tiny fit, then the subcommand on its directory, CSV file and W&B run; exit statuses
(0 healthy, 1 with --fail-on on an unhealthy run, 2 for a RUN that cannot be read); `traincraft --help` lists it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import wandb

from traincraft.cli import TraincraftCLI, main

QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY = ["--model.init_args.model=mlp", "--model.init_args.model_kwargs={hidden: [32]}", "--data.init_args.image_size=8",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=2", *QUICK]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One default-recipe fit (monitors and HealthReport on, CSV + W&B offline), shared by the tests."""
    import os

    root = tmp_path_factory.mktemp("fit")
    previous = Path.cwd()
    os.chdir(root)
    try:
        wandb.teardown()  # a fresh W&B service: one an earlier test left behind may not write this run's file
        cli = TraincraftCLI(args=["fit", *TINY])
        wandb.finish()
    finally:
        os.chdir(previous)
    return root, cli


def _report(args, capsys):
    """Exit status and output of `traincraft report ARGS` (main returns on status 0)."""
    try:
        main(["report", *args])
        code = 0
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr()


def test_the_fit_itself_wrote_a_report_next_to_its_metrics(fitted):
    root, cli = fitted
    csv_dir = root / "runs" / "csv" / "version_0"
    assert (csv_dir / "health_report" / "report.html").is_file()
    health = next(c for c in cli.trainer.callbacks if type(c).__name__ == "HealthReport")
    # every monitor of the default recipe reached the report through the CSV file
    keys = set(health.report.run.series)
    assert {"grad/norm_pre", "grad/depth_slope", "drift/ks_pvalue_min"} <= keys
    assert any(k.endswith("-update_ratio") for k in keys) and any(k.startswith("covshift/train/") for k in keys)


@pytest.mark.parametrize("which", ["run directory", "metrics.csv", "wandb run"])
def test_report_of_a_run_directory_csv_file_or_wandb_run(fitted, which, tmp_path, capsys):
    root, _ = fitted
    source = {"run directory": root / "runs" / "csv",
              "metrics.csv": root / "runs" / "csv" / "version_0" / "metrics.csv",
              "wandb run": next((root / "runs" / "wandb").glob("offline-run-*"))}[which]
    out = tmp_path / "out"
    code, captured = _report([str(source), "--out", str(out)], capsys)
    assert code == 0
    printed = captured.out
    assert printed.splitlines()[0] == f"health report: {out / 'report.html'}"
    written = json.loads((out / "diagnoses.json").read_text())
    assert written["source"] == ("wandb" if which == "wandb run" else "csv")
    assert list((out / "panels").glob("*.png")) and (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_default_out_is_next_to_the_run(fitted, capsys):
    root, _ = fitted
    code, captured = _report([str(root / "runs" / "csv" / "version_0" / "metrics.csv")], capsys)
    html = root / "runs" / "csv" / "version_0" / "health_report" / "report.html"
    assert code == 0 and captured.out.startswith(f"health report: {html}\n")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for row in rows for k in row} - {"epoch", "step"})
    lines = [",".join(["epoch", "step", *keys])]
    lines += [",".join(str(row.get(k, "")) for k in ["epoch", "step", *keys]) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fail_on_gates_on_the_severity(tmp_path, capsys):
    # dead ReLU inputs: 98% of a layer's inputs <= 0 at every log, a problem
    rows = [{"epoch": 0, "step": s, "train/loss_step": 2.3 - 0.001 * s, "covshift/train/model.blocks.0.act/dead_frac": 0.98}
            for s in range(9, 400, 10)]
    csv = _write_csv(tmp_path / "metrics.csv", rows)
    code, captured = _report([str(csv), "--fail-on", "problem"], capsys)
    assert code == 1
    assert "Dead ReLU units" in captured.out and "(--fail-on problem)" in captured.err
    code, _ = _report([str(csv), "--fail-on", "warning"], capsys)  # warning or worse includes problems
    assert code == 1
    code, captured = _report([str(csv)], capsys)  # without --fail-on: written, status 0
    assert code == 0 and "PROBLEM" in captured.out


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing", r"'.*missing' does not exist\. Pass a run directory, a metrics\.csv"),
        (lambda d: d, r"cannot read a run from .*: No run found under .*looked for"),
        (lambda d: _touch(d / "notes.txt", "hello"), r"cannot read a run from .*notes\.txt"),
        (lambda d: _touch(d / "metrics.csv", ""), r"cannot read a run from .*metrics\.csv.*empty"),
        (lambda d: _touch(d / "metrics.csv", "a,b\n1,2\n"), r"cannot read a run from .*not a Lightning CSVLogger"),
    ],
    ids=["missing path", "empty directory", "not a run file", "empty csv", "foreign csv"],
)
def test_a_run_that_cannot_be_read_exits_2_with_one_line(tmp_path, capsys, make, expected):
    import re

    code, captured = _report([str(make(tmp_path))], capsys)
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("traincraft report: error: ") and re.search(expected, lines[0])


def test_an_unwritable_out_exits_2(fitted, tmp_path, capsys):
    root, _ = fitted
    blocker = _touch(tmp_path / "file", "x")
    code, captured = _report([str(root / "runs" / "csv"), "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "Pass --out DIR with a folder you can write to" in captured.err


def test_bad_options_exit_2(capsys):
    code, captured = _report(["run", "--fail-on", "error"], capsys)
    assert code == 2 and "invalid choice: 'error'" in captured.err
    code, captured = _report([], capsys)
    assert code == 2 and "RUN" in captured.err


def test_help_lists_the_subcommand():
    exe = Path(sys.executable).with_name("traincraft")
    top = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "traincraft report RUN" in " ".join(top.stdout.split())
    sub = subprocess.run([str(exe), "report", "--help"], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0 and "--fail-on {problem,warning}" in sub.stdout and "--out DIR" in sub.stdout


def _touch(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_wandb_gets_the_histograms_and_image_grids(fitted):
    """The default recipe's monitors send W&B more than scalars: activation histograms and the augmentation grid."""
    import time

    from tests.helpers import read_wandb_records

    root, _ = fitted
    run_dir = next((root / "runs" / "wandb").glob("offline-run-*"))
    deadline = time.monotonic() + 60
    while True:  # W&B's service may still be writing the file after finish()
        records = read_wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    types = {"/".join(item.nested_key[:-1]): item.value_json
             for r in records if r.WhichOneof("record_type") == "history"
             for item in r.history.item if item.nested_key and item.nested_key[-1] == "_type"}
    assert any(k.startswith("covshift/train/") and v == '"histogram"' for k, v in types.items()), types
    assert "image" in types.get("augmentation/gallery", ""), types

"""The README's quick starts run as written (shortened to a few steps)."""

import re
from pathlib import Path

from traincraft.cli import TraincraftCLI

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_python_quick_start_runs():
    code = _block("python", "pl.Trainer")
    assert "callbacks=callbacks" in code
    short = ("pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=callbacks, "
             "logger=pl.loggers.CSVLogger('.'), enable_checkpointing=False)")
    code = re.sub(r"pl\.Trainer\([^)]*\)", short, code)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert type(namespace["model"].model).__name__ == "AlexNet"
    assert namespace["model"].trainer.global_step == 2
    assert [type(c).__name__ for c in namespace["callbacks"][:2]] == ["GradientClipping", "LearningRateMonitor"]


def test_yaml_quick_start_runs(tmp_path):
    config = tmp_path / "readme.yaml"
    config.write_text(_block("yaml", "class_path: traincraft.modules.ImageClassifier"))
    cli = TraincraftCLI(args=["fit", f"--config={config}", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                              "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert type(cli.model.model).__name__ == "TwoColumnAlexNet" and cli.trainer.global_step == 2


def test_report_quick_start_runs_on_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "csv" / "version_0"
    run.mkdir(parents=True)
    rows = "".join(f"0,{step},{2.3 * 0.9 ** step:.4f}\n" for step in range(0, 50, 5))
    (run / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    code = _block("python", "build_report")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].run.path.resolve() == run / "metrics.csv"
    assert (tmp_path / "runs" / "report" / "report.html").is_file()
    assert (tmp_path / "runs" / "report" / "panels" / "loss_accuracy.png").is_file()

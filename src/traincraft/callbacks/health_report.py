"""HealthReport: at the end of ``fit``, read the run back from its logger and write the training health report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from traincraft.loggers import REPORT_SOURCES, log_report, report_source, report_source_kind

_RANK = {"info": 0, "warning": 1, "problem": 2}


class UnhealthyRunError(RuntimeError):
    """Raised by :class:`HealthReport` (``fail_on``) when the report finds a diagnosis of that severity or worse.

    ``report`` is the :class:`~traincraft.report.Report` (``None`` on ranks other than zero) and ``html`` its page.
    """

    def __init__(self, message: str, report: Any = None, html: Optional[Path] = None) -> None:
        super().__init__(message)
        self.report = report
        self.html = html


class HealthReport(Callback):
    """Write the training health report (:func:`traincraft.report.build_report`) when ``fit`` ends: every signal
    the run logged on one page (``report.html``, PNG panels, ``diagnoses.json``) and the diagnoses, each with its
    evidence and the change that fixes it. The diagnoses are printed in a few lines (rank zero).

    The run is read back from what a logger of the trainer wrote, so the report shows exactly what the loggers
    received: a ``CSVLogger``'s ``metrics.csv`` (preferred), else a ``TensorBoardLogger``'s event folder, else a
    W&B run directory. A trainer with none of those is refused at ``setup``, before training. When W&B is a
    logger, the report folder goes to the W&B run as an artifact of type ``health-report`` and the page as
    ``wandb.Html`` (key ``health/report``). A fit that raises (a diverged run) still gets its report, with a
    warning if that fails too. Nothing runs during training: no per-step work, no host-device synchronization.
    Only rank zero builds the report; under ``fail_on`` its verdict is broadcast so every rank raises together.

    Logged (to W&B only, once, at the end of ``fit``):

    ============================ ==============================================================
    key                          content
    ============================ ==============================================================
    ``health/report``            ``wandb.Html`` of the report page (when under 8 MB)
    artifact ``health-report-*`` the report folder: ``report.html``, ``panels/*.png``, ``diagnoses.json``
    ============================ ==============================================================

    Args:
        out_dir: folder the report is written to; ``None``: ``health_report/`` next to the metrics it reads
            (e.g. ``runs/csv/version_0/health_report``).
        on: ``"fit_end"`` writes the report when ``fit`` ends (and when it raises); ``"demand"`` only when
            :meth:`write` is called.
        fail_on: ``"problem"`` or ``"warning"``: after writing, raise
            :class:`traincraft.callbacks.health_report.UnhealthyRunError` (a ``RuntimeError``; ``traincraft fit``
            exits with status 1) if a diagnosis of that severity or worse was found, to gate CI on a run's health;
            ``None``: never.
        verbose: print the report's path and one line per diagnosis (rank zero).
        wandb_wait: when the run is read from W&B (no CSV or TensorBoard logger), seconds to wait for W&B's
            service to write the fit's last steps to the run file (it appends every few seconds).

    Example:
        >>> callback = HealthReport(out_dir="runs/health", fail_on="problem")
        >>> callback.on, callback.fail_on
        ('fit_end', 'problem')
    """

    def __init__(
        self,
        out_dir: Optional[str] = None,
        on: Literal["fit_end", "demand"] = "fit_end",
        fail_on: Optional[Literal["problem", "warning"]] = None,
        verbose: bool = True,
        wandb_wait: float = 30.0,
    ) -> None:
        if on not in ("fit_end", "demand"):
            raise ValueError(f"HealthReport(on={on!r}): on must be 'fit_end' (write when fit ends) or 'demand' "
                             "(only when HealthReport.write(trainer) is called).")
        if isinstance(wandb_wait, bool) or not isinstance(wandb_wait, (int, float)) or not 0 <= wandb_wait < 3600:
            raise ValueError(f"HealthReport(wandb_wait={wandb_wait!r}): wandb_wait must be a number of seconds in "
                             "[0, 3600).")
        if fail_on not in (None, "problem", "warning"):
            raise ValueError(f"HealthReport(fail_on={fail_on!r}): fail_on must be None, 'problem' or 'warning' "
                             "(raise after writing when a diagnosis of that severity or worse is found).")
        self.out_dir = out_dir
        self.on = on
        self.fail_on = fail_on
        self.verbose = verbose
        self.wandb_wait = wandb_wait
        self.report: Any = None  # the last Report built (rank zero)
        self.html: Optional[Path] = None  # its page

    @staticmethod
    def _source_logger(trainer: pl.Trainer) -> Any:
        """The logger whose metrics the report reads (CSV, then TensorBoard, then W&B), or None."""
        kinds = {report_source_kind(logger): logger for logger in reversed(trainer.loggers)}
        return next((kinds[kind] for kind in REPORT_SOURCES if kind in kinds), None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.on != "fit_end":
            return
        if self._source_logger(trainer) is None:
            have = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "no logger"
            raise ValueError(
                f"HealthReport reads the run back from its logger, and this trainer has {have}. Add one it can read: "
                "Trainer(logger=[CSVLogger('runs'), ...]) (lightning.pytorch.loggers.CSVLogger; TensorBoardLogger or "
                "traincraft.loggers.WandbLogger also work), or remove HealthReport from the callbacks."
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on != "fit_end":
            return
        if self.fail_on is not None:  # the gate needs the verdict: a report that cannot be built is an error
            self.write(trainer)
            return
        try:
            self.write(trainer)
        except (ValueError, OSError) as error:  # the fit itself succeeded: say why there is no report, keep going
            rank_zero_warn(f"HealthReport: the report could not be written ({error}). The fit finished; retry with "
                           "`traincraft report <the run's metrics.csv or log folder>`.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if (self.on != "fit_end" or trainer.state.fn != "fit" or self._source_logger(trainer) is None
                or isinstance(exception, (UnhealthyRunError, KeyboardInterrupt))):
            return
        try:  # a diverged run is the one that most needs its report; the original error still propagates
            self._write_here(trainer)
        except Exception as error:  # noqa: BLE001 - never mask the fit's own exception
            rank_zero_warn(f"HealthReport: the report of the failed fit could not be written ({error}).")

    def write(self, trainer: pl.Trainer) -> Optional[Path]:
        """Write the report of ``trainer``'s run now (rank zero; other ranks return ``None``), print its diagnoses,
        send it to W&B loggers, and apply ``fail_on``. Call it on every rank under DDP (``fail_on`` broadcasts)."""
        html = self._write_here(trainer)
        if self.fail_on is not None:
            failing = None
            if trainer.is_global_zero:
                bad = [d for d in self.report.diagnoses if _RANK[d.severity] >= _RANK[self.fail_on]]
                if bad:
                    failing = (f"the health report found {len(bad)} diagnosis(es) of severity '{self.fail_on}' or "
                               f"worse ({', '.join(sorted({d.rule for d in bad}))}); see {html}")
            failing = trainer.strategy.broadcast(failing, src=0)
            if failing:
                raise UnhealthyRunError(failing, report=self.report, html=html)
        return html

    def _wait_for_wandb(self, trainer: pl.Trainer, source: Path) -> None:
        """W&B's service appends to the run file every few seconds, with no public flush: read it until it holds
        the last logging window of the fit (or ``wandb_wait`` seconds pass, then say what is missing)."""
        from traincraft.report import read_run

        wanted = max(trainer.global_step - trainer.log_every_n_steps, 0)
        deadline = time.monotonic() + self.wandb_wait
        while True:
            try:
                reached = read_run(source).max_step
            except (ValueError, OSError):  # nothing written yet
                reached = -1
            if reached >= wanted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if reached < wanted:
            rank_zero_warn(f"HealthReport: after {self.wandb_wait:g} s the W&B run file {source} holds steps up to "
                           f"{reached} of {trainer.global_step}: the report leaves out the rest. Add a CSVLogger "
                           "(read first, complete at once) or raise HealthReport(wandb_wait=...).")

    def _write_here(self, trainer: pl.Trainer) -> Optional[Path]:
        if not trainer.is_global_zero:
            return None
        # matplotlib and the readers load only when a report is built
        from traincraft.report import build_report

        logger = self._source_logger(trainer)
        if logger is None:
            raise ValueError("HealthReport.write: the trainer has no logger whose metrics a report can read; add a "
                             "CSVLogger, TensorBoardLogger or traincraft.loggers.WandbLogger.")
        source = report_source(logger)
        if report_source_kind(logger) == "wandb":
            self._wait_for_wandb(trainer, source)
        out_dir = Path(self.out_dir) if self.out_dir is not None else (
            source.parent if source.is_file() else source) / "health_report"
        self.report = build_report(source)
        self.html = Path(self.report.write(out_dir))
        log_report(trainer, self.html)
        if self.verbose:
            print(f"\nhealth report: {self.html}\n{self.report.summary()}")
        return self.html

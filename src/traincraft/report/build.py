"""``build_report``: read a run, diagnose it, draw its panels; ``Report.write`` puts the page on disk."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from traincraft.report._data import Diagnosis, RunMetrics
from traincraft.report.diagnoses import diagnose
from traincraft.report.html import render_html
from traincraft.report.panels import PANELS, Panel, draw_panels
from traincraft.report.sources import read_run

_SEVERITY_ORDER = {"problem": 0, "warning": 1, "info": 2}


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity; keep the fact as text
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class Report:
    """A run's health report: its metrics, the diagnoses (as data, to assert on in CI), and the panels.

    Attributes:
        run: every scalar the run logged.
        diagnoses: the verdicts of :func:`traincraft.report.diagnoses.diagnose`, worst first.
        panels: the pictures drawn (PNG bytes each).
        left_out: one line per panel the run had no keys for, naming the callback that adds it.
    """

    run: RunMetrics
    diagnoses: list[Diagnosis]
    panels: list[Panel]
    left_out: list[str] = field(default_factory=list)

    def html(self) -> str:
        """The self-contained page (what :meth:`write` saves as ``report.html``)."""
        return render_html(self.run, self.diagnoses, self.panels, self.left_out)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``report.html``, ``panels/<name>.png`` and ``diagnoses.json`` under ``out_dir``; returns the page."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"Report directory {str(out)!r} is a file; pass a directory to write "
                                     "report.html, panels/ and diagnoses.json into.")
        (out / "panels").mkdir(parents=True, exist_ok=True)
        for draw, _ in PANELS:  # a panel an earlier report drew here and this one left out must not linger
            (out / "panels" / f"{draw.__name__}.png").unlink(missing_ok=True)
        for panel in self.panels:
            (out / "panels" / f"{panel.name}.png").write_bytes(panel.png)
        records = [{k: _json_safe(v) for k, v in d.as_dict().items()} for d in self.diagnoses]
        (out / "diagnoses.json").write_text(json.dumps({"run": str(self.run.path), "source": self.run.source,
                                                        "diagnoses": records, "left_out": self.left_out},
                                                       indent=2) + "\n", encoding="utf-8")
        page = out / "report.html"
        page.write_text(self.html(), encoding="utf-8")
        return page

    def summary(self) -> str:
        """Plain text for a terminal: one line per diagnosis (or one saying there is none)."""
        if not self.diagnoses:
            return f"{self.run.path}: no diagnosis ({len(self.panels)} panels, {len(self.left_out)} left out)"
        lines = []
        for d in self.diagnoses:
            where = f" [steps {d.steps[0]}-{d.steps[1]}]" if d.steps is not None else ""
            where += f" [layer {d.layer}]" if d.layer else ""
            lines.append(f"{d.severity.upper():8s} {d.title}{where} ({d.confidence:.0%}): {d.action}")
        return "\n".join(lines)


def build_report(source: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read the run at ``source``, diagnose it and draw its panels; with ``out_dir``, also write it there.

    Args:
        source: a run directory (searched below; the newest run is taken), a ``metrics.csv``, a TensorBoard event
            folder or file, or a W&B offline run directory (see :func:`traincraft.report.read_run`).
        out_dir: where to write ``report.html``, ``panels/*.png`` and ``diagnoses.json`` (nothing is written when
            ``None``; call :meth:`Report.write` later).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "metrics.csv").write_text("epoch,step,train/loss\\n0,9,2.5\\n0,19,1.5\\n")
        >>> report = build_report(folder)
        >>> [p.name for p in report.panels], report.write(folder / "report").name
        (['loss_accuracy'], 'report.html')
    """
    run = read_run(source)
    diagnoses = sorted(list(diagnose(run)), key=lambda d: (_SEVERITY_ORDER.get(d.severity, 3), -d.confidence))
    panels, left_out = draw_panels(run)
    report = Report(run, diagnoses, panels, left_out)
    if out_dir is not None:
        report.write(out_dir)
    return report

"""The training health report: every signal a run logged on one page, and what the theory says to change.

:func:`build_report` reads a run (a directory, a Lightning ``metrics.csv``, TensorBoard events or a W&B offline
run) into :class:`RunMetrics`, runs the diagnoses (:mod:`traincraft.report.diagnoses`: each a :class:`Diagnosis`
with its evidence, confidence and action), and draws one :class:`Panel` per group of signals (loss and accuracy,
learning rate, gradients, depth profile, sharpness, activations, dead/saturated units, drift, distributed,
throughput). :meth:`Report.write` saves a self-contained ``report.html`` (no network, no script), the PNG panels
and ``diagnoses.json``. From the shell: ``traincraft report RUN``; during a fit: the ``HealthReport`` callback.
"""

from traincraft.report._data import Diagnosis, RunMetrics, Series
from traincraft.report.build import Report, build_report
from traincraft.report.diagnoses import diagnose
from traincraft.report.panels import Panel
from traincraft.report.sources import read_run

__all__ = ["Diagnosis", "Panel", "Report", "RunMetrics", "Series", "build_report", "diagnose", "read_run"]

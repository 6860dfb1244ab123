"""The report as one self-contained HTML page: inline CSS, PNG panels as ``data:`` URIs, no script, no URL.

The page opens offline from a file, an artifact viewer or a mail attachment. Every text that comes from the run
(keys, paths, evidence) is escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from traincraft.report._data import Diagnosis, RunMetrics
from traincraft.report.panels import Panel

_SEVERITY_ORDER = {"problem": 0, "warning": 1, "info": 2}
_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1080px;
       padding: 1.5em; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
.diag { border-left: 6px solid #888; background: #fff; padding: 0.6em 1em; margin: 0.8em 0;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.diag.problem { border-color: #c62828; } .diag.warning { border-color: #ef8f00; } .diag.info { border-color: #1565c0; }
.diag h3 { margin: 0 0 0.3em; font-size: 1.05em; }
.sev { text-transform: uppercase; font-size: 0.75em; font-weight: 700; letter-spacing: 0.05em; margin-right: 0.6em; }
.problem .sev { color: #c62828; } .warning .sev { color: #ef8f00; } .info .sev { color: #1565c0; }
.diag dl { display: grid; grid-template-columns: 7em 1fr; gap: 0.2em 0.8em; margin: 0; }
.diag dt { color: #555; } .diag dd { margin: 0; }
.healthy { background: #e8f5e9; border-left: 6px solid #2e7d32; padding: 0.6em 1em; }
figure { background: #fff; margin: 1em 0; padding: 0.5em; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.8em; color: #555; margin-top: 0.3em; word-break: break-all; }
code { font-size: 0.9em; background: #eee; padding: 0 0.2em; border-radius: 3px; }
ul.keys { columns: 3; font-size: 0.8em; font-family: ui-monospace, monospace; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _diagnosis(d: Diagnosis) -> str:
    where = []
    if d.steps is not None:
        where.append(f"steps {d.steps[0]}–{d.steps[1]}")
    if d.layer:
        where.append(f"layer <code>{_e(d.layer)}</code>")
    if d.value is not None:
        where.append(f"value {d.value:.4g}" + (f" against threshold {d.threshold:.4g}" if d.threshold is not None
                                                 else ""))
    rows = [("evidence", _e(d.evidence) + (f"<br><small>{'; '.join(where)}</small>" if where else "")),
            ("action", _e(d.action)), ("theory", _e(d.theory)), ("confidence", f"{d.confidence:.0%}")]
    if d.keys:
        rows.append(("keys", ", ".join(f"<code>{_e(k)}</code>" for k in d.keys)))
    body = "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in rows)
    return (f'<section class="diag {_e(d.severity)}" id="diag-{_e(d.rule)}"><h3><span class="sev">'
            f"{_e(d.severity)}</span>{_e(d.title)}</h3><dl>{body}</dl></section>")


def _panel(panel: Panel) -> str:
    data = base64.b64encode(panel.png).decode("ascii")
    keys = ", ".join(panel.keys[:12]) + (f" … ({len(panel.keys)} keys)" if len(panel.keys) > 12 else "")
    return (f'<figure id="panel-{_e(panel.name)}"><img alt="{_e(panel.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(panel.title)}: {_e(keys)}</figcaption></figure>")


def render_html(run: RunMetrics, diagnoses: Sequence[Diagnosis], panels: Sequence[Panel],
                left_out: Sequence[str], title: str = "Training health report") -> str:
    """The page: diagnoses (worst first), panels, the panels left out, then the run's source and its keys."""
    ordered = sorted(diagnoses, key=lambda d: (_SEVERITY_ORDER.get(d.severity, 3), -d.confidence))
    counts = {s: sum(d.severity == s for d in ordered) for s in _SEVERITY_ORDER}
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n) or "no diagnosis"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}: {_e(Path(run.path).name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{_e(run.source)} run <code>{_e(run.path)}</code> · {len(run.series)} metric keys · '
        f"last step {run.max_step} · {_e(summary)}</p>",
        "<h2>Diagnoses</h2>",
    ]
    if ordered:
        parts += [_diagnosis(d) for d in ordered]
    else:
        parts.append('<p class="healthy">No diagnosis: none of the rules found a problem in the signals this run '
                     "logged. Signals it did not log (below) were not checked.</p>")
    parts.append("<h2>Panels</h2>")
    parts += [_panel(p) for p in panels] or ["<p>The run logged none of the signals a panel draws.</p>"]
    if left_out:
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>{_e(line)}</li>" for line in left_out) + "</ul>")
    parts.append(f"<h2>Run</h2><p>Read from <code>{_e(run.path)}</code> ({_e(run.source)}).</p>")
    parts.append('<ul class="keys">' + "".join(f"<li>{_e(k)} ({len(run.series[k])})</li>"
                                             for k in sorted(run.series)) + "</ul>")
    if run.other:
        parts.append("<p>Also logged (not drawn): " + ", ".join(f"<code>{_e(k)}</code> ({_e(v)})"
                                                                for k, v in sorted(run.other.items())) + "</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

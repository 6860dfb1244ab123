"""``traincraft report RUN``: the health report of a run from the shell, with an exit status to gate CI on."""

from __future__ import annotations

import sys
from pathlib import Path

from traincraft._cli.checks import _unwritable

_SEVERITY_RANK = {"info": 0, "warning": 1, "problem": 2}


def report_main(argv: list[str]) -> int:
    """``traincraft report RUN [--out DIR] [--fail-on {problem,warning}]``: write the health report of a run.

    ``RUN`` is a run directory, a ``metrics.csv``, a TensorBoard event folder or file, or a W&B run directory.
    Prints the page's path and one line per diagnosis; returns the exit status: 0, 1 when ``--fail-on`` finds a
    diagnosis of that severity or worse, 2 for a ``RUN`` that cannot be read (one line saying why).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="traincraft report",
        description="Write the training health report of a run (report.html, panels/*.png, diagnoses.json) and "
        "print its diagnoses. docs/health-report.md explains the panels and the rules.",
    )
    parser.add_argument("run", metavar="RUN", help="a run directory, a metrics.csv, a TensorBoard event folder or "
                        "file, or a W&B run directory (wandb/offline-run-*)")
    parser.add_argument("--out", metavar="DIR", help="folder to write to (default: RUN/health_report, or next to a "
                        "file RUN)")
    parser.add_argument("--fail-on", choices=("problem", "warning"), help="exit with status 1 when a diagnosis of "
                        "this severity or worse is found (to gate CI on a run's health)")
    args = parser.parse_args(argv)
    run = Path(args.run).expanduser()
    if not run.exists():
        print(f"traincraft report: error: {args.run!r} does not exist. Pass a run directory, a metrics.csv, a "
              "TensorBoard event folder or a W&B run directory.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "health_report"
    reason = _unwritable(str(out))
    if reason is not None:
        print(f"traincraft report: error: cannot write the report to {str(out)!r}: {reason}. Pass --out DIR with a "
              "folder you can write to.", file=sys.stderr)
        return 2
    from traincraft.report import build_report  # matplotlib loads only for this subcommand

    try:
        report = build_report(run)
    except (ValueError, OSError) as error:  # nothing readable there, or an unreadable file: the reader says which
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"traincraft report: error: cannot read a run from {str(run)!r}: {message}", file=sys.stderr)
        return 2
    html = report.write(out)
    print(f"health report: {html}")
    print(report.summary())
    if args.fail_on is not None:
        bad = [d for d in report.diagnoses if _SEVERITY_RANK[d.severity] >= _SEVERITY_RANK[args.fail_on]]
        if bad:
            print(f"traincraft report: {len(bad)} diagnosis(es) of severity '{args.fail_on}' or worse "
                  f"(--fail-on {args.fail_on})", file=sys.stderr)
            return 1
    return 0

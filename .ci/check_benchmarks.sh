#!/usr/bin/env bash
# CI: the version is one number everywhere, the GPU check answers on this machine, and every benchmark still runs.
#   1. pyproject.toml's [project] version == traincraft.__version__ == the newest CHANGELOG.md entry;
#   2. benchmarks/gpu_check.py --dry-run lists its plan; benchmarks/gpu_check.py then runs every GPU check on a
#      CUDA machine (under 8 minutes: runs/gpu_check/gpu_check.{json,md}) or says in one line that there is none;
#   3. tests/test_benchmarks_smoke.py: each script in benchmarks/ at its smallest setting (~90 s on 2 cores).
#      Set SKIP_BENCHMARK_SMOKE=1 when the full test suite (which includes them) already ran.
# Needs `make install` (.venv). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
START=$SECONDS
step() { printf '[check_benchmarks %3ds] %s\n' "$((SECONDS - START))" "$*"; }

step "version: pyproject.toml, traincraft.__version__ and CHANGELOG.md agree"
"$PY" - <<'PYEOF'
import re
from pathlib import Path

import traincraft

# the first `version = "..."` after [project] (tomllib only exists from Python 3.11)
project = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', Path("pyproject.toml").read_text(), re.M | re.S).group(1)
entry = re.search(r"^## \[?(\d+\.\d+\.\d+[^\]\s]*)\]?", Path("CHANGELOG.md").read_text(), re.M)
found = {"pyproject.toml": project, "traincraft.__version__": traincraft.__version__,
         "CHANGELOG.md (newest entry)": entry.group(1) if entry else None}
if len(set(found.values())) != 1:
    raise SystemExit(f"version mismatch: {found}; bump all three together (CHANGELOG.md gets a '## X.Y.Z - date' entry)")
print(f"  version {project} in all three")
PYEOF

step "benchmarks/gpu_check.py --dry-run"
"$PY" benchmarks/gpu_check.py --dry-run
step "benchmarks/gpu_check.py"
"$PY" benchmarks/gpu_check.py

if [ "${SKIP_BENCHMARK_SMOKE:-0}" = 1 ]; then
    step "benchmark smoke runs skipped (SKIP_BENCHMARK_SMOKE=1)"
else
    step "every benchmark at its smallest setting: tests/test_benchmarks_smoke.py"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_benchmarks_smoke.py
fi
step "done"

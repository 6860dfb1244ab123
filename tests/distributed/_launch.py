"""Run one of this folder's multi-process scripts in a fresh interpreter and fail with its stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def run_script(script: str, *args: object, cwd: Optional[Path] = None, timeout: int = 300) -> None:
    """Run ``tests/distributed/<script>`` with ``args``; one thread per process, the repository on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]

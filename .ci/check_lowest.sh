#!/usr/bin/env bash
# CI: the lowest versions pyproject.toml allows still work. Installs into a separate virtual environment
# (.venv-lowest/, git-ignored; rebuilt when pyproject.toml, constraints-lowest.txt or this script change) torch
# 2.13.0 (the CPU build, the only one installable here) and the lowest lightning, torchmetrics, kornia and
# jsonargparse (constraints-lowest.txt), then traincraft itself (a wheel built from the checkout, not editable) with
# the dev extra, and runs the tests against the installed package: every test directory (each package of
# src/traincraft has one) with -m "not slow and not gpu", no doctests (they import src/, not the installed wheel;
# `make test` runs them); litdata is not installed, so the streaming tests skip. Needs only Python 3.10+ and pip's
# index. Usage: .ci/check_lowest.sh [extra pytest arguments, e.g. -x or -k EXPR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${LOWEST_VENV:-$ROOT/.venv-lowest}
VPY="$VENV/bin/python"
START=$SECONDS
step() { printf '[check_lowest %3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[check_lowest] FAILED: %s\n' "$*" >&2; exit 1; }

# traincraft itself, built in a copy of the checkout (pip's in-tree build would leave build/ and src/*.egg-info in
# it); reinstalled without its dependencies whenever the source changes, so a reused environment tests this checkout.
install_traincraft() {
    local extra=$1 src log
    shift
    src=$(mktemp -d "${TMPDIR:-/tmp}/traincraft-lowest-src.XXXXXX")
    log=$(mktemp "${TMPDIR:-/tmp}/traincraft-lowest-pip.XXXXXX")
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$src"
    "$VPY" -m pip install --quiet -c constraints-lowest.txt "$@" "$src$extra" >"$log" 2>&1 \
        || { tail -30 "$log"; fail "pip install traincraft"; }
    rm -rf "$src" "$log"
}

STAMP="$VENV/.installed"
SRCSUM=$(git ls-files -z --cached --others --exclude-standard src | xargs -0 cat | sha256sum | cut -c1-16)
WANT=$(cat pyproject.toml constraints-lowest.txt "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    step "fresh virtual environment $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    LOG=$(mktemp "${TMPDIR:-/tmp}/traincraft-lowest-pip.XXXXXX")
    pip_install() {
        "$VPY" -m pip install --quiet -c constraints-lowest.txt "$@" >"$LOG" 2>&1 \
            || { grep -v "is neither a file nor a directory" "$LOG" | tail -30; fail "pip install $*"; }
    }
    step "torch==2.13.0 first (an unpinned torch pulls the CUDA build)"
    pip_install torch==2.13.0
    step "traincraft (not editable) with the dev extra under constraints-lowest.txt"
    install_traincraft "[dev]"
    rm -f "$LOG"
    echo "$SRCSUM" >"$VENV/.traincraft"
    echo "$WANT" >"$STAMP"
else
    step "reusing $VENV (pyproject.toml and constraints-lowest.txt unchanged)"
    if [ "$(cat "$VENV/.traincraft" 2>/dev/null)" != "$SRCSUM" ]; then
        step "src/ changed: reinstalling traincraft alone (--no-deps)"
        install_traincraft "" --no-deps --force-reinstall
        echo "$SRCSUM" >"$VENV/.traincraft"
    fi
fi

# The pins must have won: a resolver that quietly picked a newer version would test nothing.
"$VPY" - constraints-lowest.txt <<'PYEOF' || fail "installed versions differ from constraints-lowest.txt"
import re, sys
from importlib.metadata import version

pins = dict(re.match(r"([\w-]+)(?:\[[\w,]+\])?==(\S+)", line).groups()
            for line in open(sys.argv[1]) if line.strip() and not line.startswith("#"))
have = {name: version(name) for name in pins}
wrong = {n: (pins[n], have[n]) for n in pins if have[n].split("+")[0] != pins[n]}
others = {n: version(n) for n in ("numpy", "scikit-learn", "wandb", "lightning-utilities")}
print("  " + ", ".join(f"{n} {v}" for n, v in {**have, **others}.items()))
if wrong:
    print("  pinned vs installed:", wrong, file=sys.stderr)
sys.exit(1 if wrong else 0)
PYEOF

step "pytest tests/ -m 'not slow' against the installed traincraft"
export WANDB_MODE=offline WANDB_SILENT=true
# -o addopts=-ra: no --doctest-modules (pyproject's addopts); the installed package, not src/, is under test.
"$VPY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m "not slow and not gpu" tests "$@" \
    || fail "the test suite at the lowest versions (above); fix it compatibly or raise the lower bound in pyproject.toml"
"$VPY" -c "import sys, traincraft; assert '$VENV' in traincraft.__file__, traincraft.__file__; print('  tested', traincraft.__file__)"
step "PASSED at the lowest versions of constraints-lowest.txt"

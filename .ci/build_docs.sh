#!/usr/bin/env bash
# CI: the API reference builds with warnings as errors and shows what the docstrings promise. Installs the `docs`
# extra's requirements into .venv (not the package again: `make install` made it editable), runs
# `mkdocs build --strict` into a temporary directory (a link to a missing page or anchor fails too), then reads
# the HTML: every name of every traincraft `__all__` has its entry, and every RST table of a docstring (the metric
# keys a callback, strategy or module logs) came out as an HTML table holding each key. Needs `make install`.
# About 20 s plus the pip install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/traincraft-docs.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
step() { printf '[build_docs %3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[build_docs] FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || fail ".venv is missing: run \`make install\` first"
mapfile -t REQS < <("$PY" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs'], sep='\n')")
step "installing the docs extra: ${REQS[*]}"
"$PY" -m pip install --quiet -c constraints.txt "${REQS[@]}" || fail "pip install of the docs extra"

step "mkdocs build --strict"
"$PY" -m mkdocs build --strict --site-dir "$TMP/site" >"$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; fail "mkdocs build --strict"; }
# --strict fails on warnings only; mkdocs reports a link to a missing anchor or an unrecognized relative link at
# INFO level (mkdocs.yml's `validation:` could raise them), so they are failures here.
if grep -E "WARNING|INFO +- +Doc file" "$TMP/build.log"; then
    grep -qE "INFO +- +Doc file" "$TMP/build.log" && fail "broken links or anchors in docs/ (above): fix the link, or the heading it points at"
fi

step "checking the rendered reference"
"$PY" - "$TMP/site" <<'PYCHECK' || fail "the rendered reference misses entries or tables (above)"
import html, importlib, pkgutil, re, sys
from pathlib import Path

import traincraft

BORDER = re.compile(r"^ *=+(?: +=+)+ *$")


def table_keys(doc: str) -> list[list[str]]:
    """The code-formatted first cells of each RST table's body rows: the keys (or module names) it lists."""
    lines, tables = doc.split("\n"), []
    borders = [i for i, line in enumerate(lines) if BORDER.match(line)]
    for first, second, third in zip(borders[0::3], borders[1::3], borders[2::3]):
        column = len(lines[first]) - len(lines[first].lstrip())
        tables.append([m.group(1) for line in lines[second + 1:third]
                       if (m := re.match(r"``([^`]+)``", line[column:]))])
    return tables


site = Path(sys.argv[1])
pages = {p: p.read_text() for p in (site / "api").glob("*/index.html")}
anchors = {a: page for page, text in pages.items() for a in re.findall(r'<h2 id="(traincraft\.[\w.]+)"', text)}
modules = [traincraft] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(traincraft.__path__, "traincraft.")
                          if not m.name.rsplit(".", 1)[-1].startswith("_")]
problems, seen, n_tables, n_keys = [], {}, 0, 0
for module in modules:
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if id(obj) in seen:
            continue
        # Documented under any public path of the same object (traincraft.SafeCheckpointIO as
        # traincraft.checkpoint.SafeCheckpointIO).
        found = [a for a in anchors if a.rsplit(".", 1)[-1] == name
                 and getattr(importlib.import_module(a.rsplit(".", 1)[0]), name, None) is obj]
        seen[id(obj)] = found
        if not found:
            problems.append(f"{module.__name__}.{name}: no entry in the API reference "
                            f"(add `::: {module.__name__}.{name}` to a page of docs/api/)")
            continue
        expected = table_keys(getattr(obj, "__doc__", None) or "") if isinstance(obj, type) else []
        if not expected:
            continue
        text = pages[anchors[found[0]]]
        start = text.index(f'<h2 id="{found[0]}"')
        end = text.find("<h2 ", start + 1)
        rendered = re.findall(r"<table>.*?</table>", text[start:end if end > 0 else None], re.DOTALL)
        for keys in expected:
            hit = [t for t in rendered if all(f"<code>{html.escape(k, quote=False)}</code>" in t for k in keys)]
            if not hit:
                problems.append(f"{found[0]}: the docstring table with {keys} is not an HTML table in the reference")
            n_tables, n_keys = n_tables + 1, n_keys + len(keys)
if problems:
    print(*problems, sep="\n")
print(f"{len(seen)} public objects of {sum(hasattr(m, '__all__') for m in modules)} __all__ lists have entries; "
      f"{n_tables} docstring tables ({n_keys} keys) rendered as HTML tables")
sys.exit(1 if problems else 0)
PYCHECK
step "ok: API reference built with --strict (mkdocs.yml, docs/api/)"

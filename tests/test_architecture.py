"""docs/architecture.md stays true: every unit of src/traincraft sits on one floor of its table, no import runs up a
floor or forms a cycle between units, and every source path the page names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "traincraft"
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def _floors() -> dict[str, int]:
    floors = {}
    for line in PAGE.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if match:
            for unit in re.findall(r"`([\w]+)`", match.group(2)):
                assert unit not in floors, f"{unit} is on two floors of docs/architecture.md"
                floors[unit] = int(match.group(1))
    return floors


def _unit(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports() -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) -> one file where it happens; lazy imports inside functions count too."""
    edges = {}
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "traincraft":
                    target = parts[1] if len(parts) > 1 else "__init__"
                    if target != unit:
                        edges.setdefault((unit, target), str(path.relative_to(ROOT)))
    return edges


def test_every_unit_is_on_a_floor():
    units = {_unit(path) for path in SRC.rglob("*.py")}
    floors = _floors()
    assert not units - floors.keys(), f"add these units to the floors table of docs/architecture.md: {units - floors.keys()}"
    assert not floors.keys() - units, f"docs/architecture.md lists units that do not exist: {floors.keys() - units}"


def test_no_import_runs_up_a_floor():
    floors = _floors()
    upward = [f"{where}: {unit} (floor {floors[unit]}) imports {target} (floor {floors[target]})"
              for (unit, target), where in _imports().items() if floors[target] > floors[unit]]
    assert not upward, "\n".join(upward)


def test_units_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for unit, target in _imports():
        graph.setdefault(unit, set()).add(target)
    done: set[str] = set()

    def visit(unit: str, path: tuple[str, ...]) -> None:
        assert unit not in path, f"import cycle: {' -> '.join(path + (unit,))}"
        if unit in done:
            return
        for target in graph.get(unit, ()):
            visit(target, path + (unit,))
        done.add(unit)

    for unit in list(graph):
        visit(unit, ())


def test_every_source_path_the_page_names_exists():
    named = set(re.findall(r"`((?:[\w]+/)*[\w]+\.py)`", PAGE)) | set(re.findall(r"`((?:[\w]+/)+)`", PAGE))
    missing = [p for p in sorted(named) if not (SRC / p).exists() and not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"

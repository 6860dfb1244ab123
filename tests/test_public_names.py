"""Public import paths survive refactoring: every name in a package's `__all__` imports, and every public
`module:name` of tests/public_api.txt (the public modules' names when the file was written, issue 17) still imports
from that module and is the object the package exports under the same name."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import traincraft

RECORDED = Path(__file__).with_name("public_api.txt")


def _packages() -> list[str]:
    found = pkgutil.walk_packages(traincraft.__path__, "traincraft.")
    return ["traincraft"] + sorted(m.name for m in found if m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_"))


@pytest.mark.parametrize("package", _packages())
def test_every_name_in_all_imports(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} has no __all__: a public package re-exports its names there (STYLE.md rule 1)"
    assert len(set(names)) == len(names), f"{package}.__all__ repeats a name"
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which {package} does not define"


def _recorded() -> list[str]:
    return [line for line in RECORDED.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", _recorded())
def test_a_recorded_public_path_still_imports(path):
    module_name, name = path.split(":")
    module = importlib.import_module(module_name)
    assert hasattr(module, name), f"from {module_name} import {name} no longer works"
    package = importlib.import_module(module_name.rsplit(".", 1)[0]) if module_name.count(".") > 1 else None
    if package is not None and name in getattr(package, "__all__", ()):
        assert getattr(package, name) is getattr(module, name), f"{module_name}.{name} is not {package.__name__}.{name}"

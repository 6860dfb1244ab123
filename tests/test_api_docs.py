"""The API reference (docs/api, mkdocs.yml): every public name has an entry, docstrings render as promised.

The full build (`mkdocs build --strict` and a check of the HTML) is .ci/build_docs.sh; these tests need no docs
extra: they read the pages' `::: path` directives and run the docstring rewrites of docs/api/_docstrings.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import traincraft

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
_spec = importlib.util.spec_from_file_location("_api_docstrings", API / "_docstrings.py")
docstrings = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docstrings)


def _public_modules() -> list:
    found = pkgutil.walk_packages(traincraft.__path__, "traincraft.")
    return [traincraft] + [importlib.import_module(m.name) for m in found if not m.name.rsplit(".", 1)[-1].startswith("_")]


def _resolve(path: str):
    """The object a `::: path` directive documents, attribute first as griffe does: `traincraft.data.download` is
    the function the package exports, not the submodule of that name."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=2):
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(".".join(parts[:index]))
    return obj


DIRECTIVES = {m.group(1): page.name for page in sorted(API.glob("*.md"))
              for m in re.finditer(r"^::: ([\w.]+)$", page.read_text(), re.MULTILINE)}
EXPORTS = sorted({(module.__name__, name) for module in _public_modules() for name in getattr(module, "__all__", ())})
MKDOCS = (ROOT / "mkdocs.yml").read_text()


def test_every_directive_resolves_and_every_page_is_in_the_nav():
    assert len(DIRECTIVES) > 100
    for path in DIRECTIVES:
        _resolve(path)  # an AttributeError/ImportError names the stale entry
    for page in API.glob("*.md"):
        assert f"api/{page.name}" in MKDOCS, f"docs/api/{page.name} is not in mkdocs.yml's nav"


@pytest.mark.parametrize(("module", "name"), EXPORTS, ids=[f"{m}.{n}" for m, n in EXPORTS])
def test_every_public_name_has_an_entry(module, name):
    obj = getattr(importlib.import_module(module), name)
    documented = [path for path in DIRECTIVES if path.rsplit(".", 1)[-1] == name and _resolve(path) is obj]
    assert documented, f"{module}.{name} is in __all__ but no docs/api/*.md has `::: {module}.{name}`"


def _classes_with_tables() -> list[type]:
    objects = {id(getattr(m, n)): getattr(m, n) for m in _public_modules() for n in getattr(m, "__all__", ())}
    return [o for o in objects.values() if isinstance(o, type) and re.search(r"^ *=+ +=+", o.__doc__ or "", re.M)]


TABLED = _classes_with_tables()


def _table_keys(doc: str) -> list[list[str]]:
    """The code-formatted first cells of each RST table's body rows (between its second and third border)."""
    lines = doc.split("\n")
    borders = [i for i, line in enumerate(lines) if re.match(r"^ *=+(?: +=+)+ *$", line)]
    return [[m.group(1) for line in lines[second + 1:third] if (m := re.match(r" *``([^`]+)``", line))]
            for second, third in zip(borders[1::3], borders[2::3], strict=True)]


@pytest.mark.parametrize("cls", TABLED, ids=[c.__name__ for c in TABLED])
def test_metric_key_tables_render_as_html_tables(cls):
    markdown = pytest.importorskip("markdown")
    doc = inspect.cleandoc(cls.__doc__)
    keys = [key for table in _table_keys(doc) for key in table]
    html = markdown.markdown(docstrings.normalize(doc), extensions=["tables"])
    tables = re.findall(r"<table>.*?</table>", html, re.DOTALL)
    assert tables and keys, f"{cls.__name__}: no table rendered, or no keys read"
    for key in keys:
        assert any(f"<code>{key}</code>" in table.replace("&lt;", "<").replace("&gt;", ">")
                   for table in tables), f"{cls.__name__}: {key} is not a table cell"


def test_callbacks_that_log_have_tables():
    from traincraft import callbacks

    tabled = {c.__name__ for c in TABLED}
    assert set(callbacks.__all__) <= tabled, set(callbacks.__all__) - tabled


def test_rst_table_rows_continuations_overflow_and_pipes():
    text = "\n".join([
        "Keys:",
        "",
        "======== ==========",
        "key      meaning",
        "======== ==========",
        "``a``    first",
        "         continued",
        "``long_key`` overflows its column",
        "``x|y``  a|b",
        "======== ==========",
        "",
        "After.",
    ])
    assert docstrings.rst_tables_to_markdown(text).split("\n") == [
        "Keys:",
        "",
        "| key | meaning |",
        "|---|---|",
        "| ``a`` | first continued |",
        "| ``long_key`` | overflows its column |",
        r"| ``x|y`` | a\|b |",
        "",
        "After.",
    ]


def test_headerless_table_and_text_without_tables():
    text = "===  ===\n1    2\n===  ===\n"
    assert docstrings.rst_tables_to_markdown(text).split("\n")[1:4] == ["|  |  |", "|---|---|", "| 1 | 2 |"]
    plain = "No table.\n\n    x = 1  # == but no border\n"
    assert docstrings.rst_tables_to_markdown(plain) == plain


def test_shared_args_become_one_entry_each_and_other_sections_are_left_alone():
    text = "Args:\n    x: one.\n    a, b,\n        c: as in\n        X.\n    d: two\n        lines.\n\nReturns:\n    a, b: c\n"
    assert docstrings.split_shared_args(text) == (
        "Args:\n    x: one.\n    a: as in X.\n    b: as in X.\n    c: as in X.\n    d: two\n        lines.\n\n"
        "Returns:\n    a, b: c\n")


def test_sphinx_roles_become_code_and_example_becomes_examples():
    text = "See :class:`~traincraft.data.ImageDataModule` and :func:`traincraft.models.build_model`.\n\nExample:\n    >>> 1\n"
    assert docstrings.normalize(text) == (
        "See `ImageDataModule` and `traincraft.models.build_model`.\n\nExamples:\n    >>> 1\n")

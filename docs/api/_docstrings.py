"""Griffe extension for the API reference: traincraft's docstrings as mkdocstrings' Google parser reads them.

traincraft's docstrings are Google style with a few reStructuredText habits that read well in ``help()`` and in the
source but not in Markdown. Before griffe parses a docstring this extension rewrites, in the rendered copy only:

- RST simple tables (``====`` borders; the metric-key tables) as Markdown pipe tables;
- ``Example:`` as ``Examples:``, the section griffe renders as doctest code (``Example:`` is an admonition whose
  ``>>>`` lines would be read as Markdown, ``x[1:]`` becoming a broken cross-reference);
- an ``Args:`` entry for several names (``a, b, c: as in X``) as one entry per name;
- Sphinx roles (``:class:`~a.B` ``) as code spans.

mkdocs.yml loads it by path; tests/test_api_docs.py tests these functions.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from griffe import Extension
except ImportError:  # no docs extra: the rewrites below still import for tests/test_api_docs.py
    Extension = object

_BORDER = re.compile(r"^(?P<indent> *)=+(?: +=+)+ *$")
_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _columns(border: str) -> list[int]:
    """Start offsets of the columns of a border line (``====  =====``)."""
    return [m.start() for m in re.finditer(r"=+", border)]


def _cells(line: str, starts: list[int]) -> list[str]:
    """Split one row at the column starts; a word that runs past a column's end stays in its cell."""
    cells, begin = [], starts[0]
    for start in starts[1:]:
        cut = max(start, begin)
        while 0 < cut < len(line) and not line[cut - 1].isspace() and not line[cut].isspace():
            cut += 1  # the text overflows this column (RST would refuse it; docutils-free readers accept it)
        cells.append(line[begin:cut].strip())
        begin = cut
    cells.append(line[begin:].strip())
    return cells


def _escape(text: str) -> str:
    """Escape pipes outside code spans: Python-Markdown's tables keep pipes inside backticks."""
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(text[last:m.start()].replace("|", r"\|"))
        out.append(m.group(0))
        last = m.end()
    out.append(text[last:].replace("|", r"\|"))
    return "".join(out)


def _rows(lines: list[str], starts: list[int]) -> list[list[str]]:
    """Rows of a table body; a line whose first cell is blank continues the row above (RST's rule)."""
    rows: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        cells = _cells(line, starts)
        if rows and not cells[0]:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


def _markdown(indent: str, header: list[list[str]], body: list[list[str]], width: int) -> list[str]:
    head = [" ".join(cell for cell in column if cell) for column in zip(*header, strict=True)] if header else [""] * width
    lines = ["", indent + "| " + " | ".join(_escape(c) for c in head) + " |",
             indent + "|" + "|".join("---" for _ in head) + "|"]
    lines += [indent + "| " + " | ".join(_escape(c) for c in row) + " |" for row in body]
    return lines + [""]


def rst_tables_to_markdown(text: str) -> str:
    """Rewrite every RST simple table in ``text`` as a Markdown pipe table; leave everything else as it is.

    A table is a border line, rows, a border; with a header, the header rows sit between the first two of three
    borders. Continuation lines (first cell blank) are joined to the row above.

    Example:
        >>> print(rst_tables_to_markdown("Keys:\\n\\n===  ====\\nkey  meaning\\n===  ====\\n``a``  first\\n===  ====\\n"))
        Keys:
        <BLANKLINE>
        | key | meaning |
        |---|---|
        | ``a`` | first |
        <BLANKLINE>
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _BORDER.match(lines[i])
        borders = [j for j in range(i + 1, len(lines)) if lines[j].strip() == lines[i].strip()][:2] if match else []
        if not match or not borders:
            out.append(lines[i])
            i += 1
            continue
        starts = _columns(lines[i])
        second = borders[0]
        # A third border right after the body (no blank line between) makes the first block a header.
        third = borders[1] if len(borders) > 1 and all(
            line.strip() for line in lines[second + 1:borders[1]]) else None
        if third is None:
            header, body, end = [], _rows(lines[i + 1:second], starts), second
        else:
            header, body, end = _rows(lines[i + 1:second], starts), _rows(lines[second + 1:third], starts), third
        if out and not out[-1].strip():
            out.pop()  # _markdown starts with the blank line a Markdown table needs
        out += _markdown(match.group("indent"), header, body, len(starts))
        i = end + 1
        if i < len(lines) and not lines[i].strip():
            i += 1
    return "\n".join(out)


_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_SECTION = re.compile(r"^ *(?P<name>[A-Z][a-z]+):$")
_NAMES = r"[A-Za-z_]\w*(?:, *[A-Za-z_]\w*)*"
_FIRST = re.compile(rf"^(?P<indent> *)(?P<names>{_NAMES})(?:,|: (?P<rest>.*))$")  # an entry's first line
_MORE = re.compile(rf"^ *(?P<names>{_NAMES})(?:,|: (?P<rest>.*))$")  # names continued on the next line


def sphinx_roles_to_code(text: str) -> str:
    """``:class:`~traincraft.data.ImageDataModule``` -> ```ImageDataModule```; without ``~`` the full path stays."""
    def code(match: re.Match[str]) -> str:
        target = match.group(1)
        shown = target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target
        return f"`{shown}`"
    return _ROLE.sub(code, text)


def split_shared_args(text: str) -> str:
    """In ``Args:``, an entry naming several parameters (``a, b,\\n    c: as in X``) becomes one entry per name."""
    lines, out, section, i = text.split("\n"), [], None, 0
    while i < len(lines):
        header = _SECTION.match(lines[i])
        section = header.group("name") if header else section
        first = _FIRST.match(lines[i]) if section in ("Args", "Arguments") and not header else None
        if first is None:
            out.append(lines[i])
            i += 1
            continue
        indent, names, match, j = first.group("indent"), [], first, i
        while match and match.group("rest") is None:  # the names run over several lines before the colon
            names += match.group("names").split(",")
            j += 1
            match = _MORE.match(lines[j]) if j < len(lines) else None
        if match is None or not (names := [n.strip() for n in names + match.group("names").split(",")])[1:]:
            out.append(lines[i])  # a single name: griffe reads it as it is
            i += 1
            continue
        rest, j = match.group("rest"), j + 1
        while j < len(lines) and lines[j].startswith(indent + " ") and lines[j].strip():
            rest += " " + lines[j].strip()  # the shared description's continuation lines
            j += 1
        out += [f"{indent}{name}: {rest}" for name in names]
        i = j
    return "\n".join(out)


def normalize(text: str) -> str:
    """Every rewrite of the module docstring, in order."""
    text = re.sub(r"^( *)Example:$", r"\1Examples:", text, flags=re.MULTILINE)
    return sphinx_roles_to_code(split_shared_args(rst_tables_to_markdown(text)))


class TraincraftDocstrings(Extension):
    """Rewrite every docstring griffe loads for mkdocstrings (see the module docstring)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalize(obj.docstring.value)

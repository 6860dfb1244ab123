"""The recipes that ship inside the package (``traincraft/recipes/*.yaml``), so ``--config NAME`` works from any
directory: their names and descriptions, their files, and the command line with names replaced by paths."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from traincraft._cli.errors import _UserError

_RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CONFIG_FLAGS = ("--config", "-c")


def recipes() -> dict[str, str]:
    """The shipped recipes: ``{name: description}``, the description being each file's first comment line.

    Example:
        >>> "digits_alexnet_small" in recipes()
        True
    """
    found = {}
    for entry in sorted(resources.files("traincraft").joinpath("recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            found[entry.name[: -len(".yaml")]] = first.lstrip("#").strip()
    return found


def recipe_path(name: str) -> str:
    """The file of the shipped recipe ``name`` (with or without ``.yaml``); a clear error for an unknown name."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = recipes()
    if stem not in names:
        raise _UserError(
            f"--config {name!r} is neither a file nor a shipped recipe; the shipped recipes are "
            f"{', '.join(names)}. Pass one of those names, or the path of a YAML file (`traincraft recipes` lists "
            "the recipes with a line each)."
        )
    with resources.as_file(resources.files("traincraft").joinpath("recipes", f"{stem}.yaml")) as path:
        return str(path)  # a real file: the package is installed unzipped (setuptools' default)


def _resolve_config(value: str) -> str:
    """A ``--config`` value as given when it is a file or not name-like (inline YAML, a missing path with
    directories: jsonargparse reports those); else the shipped recipe of that name."""
    if Path(value).expanduser().is_file() or not _RECIPE_NAME.fullmatch(value):
        return value
    if "." in value and not value.endswith(".yaml"):  # e.g. my.yml: a file name, not a recipe name
        return value
    return recipe_path(value)


def resolve_recipe_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config NAME`` (or ``--config=NAME``, ``-c NAME``) naming a shipped recipe replaced
    by that recipe's path; paths to existing files are kept as they are."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = _resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + _resolve_config(arg[len("--config="):])
    return resolved


def print_recipes() -> None:
    """``traincraft recipes``: one line per shipped recipe."""
    names = recipes()
    width = max(map(len, names), default=0)
    for name, description in names.items():
        print(f"{name:<{width}}  {description}")
    print("\nRun one with `traincraft fit --config NAME`; `traincraft fit --config NAME --print_config > my.yaml` "
          "writes it out to edit.")


"""``errors.py``'s docstring tree is complete: every ``RemotecliError`` subclass of the package,
wherever it is defined, appears in it under its parent with its HTTP status and code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import remotecli
from remotecli import errors
from remotecli.errors import RemotecliError

# Not imported: the guest agent runs inside the VM (standard library only, no remotecli.errors),
# Alembic's migration scripts need Alembic's runtime context, __main__ modules run the CLI.
SKIPPED_PREFIXES = ("remotecli.agent.guest", "remotecli.db.migrations")

_ENTRY = re.compile(
    r"^(?P<prefix>[ │├└─]*)(?P<name>[A-Z]\w+)\s+(?P<status>\d{3})\s+(?P<code>[a-z_]+)\b"
    r"(?:\s+\[(?P<module>[\w/]+\.py)\])?"
)


@dataclass(frozen=True)
class Entry:
    name: str
    status: int
    code: str
    parent: str | None
    module: str | None  # "services/transitions.py" for a class defined outside errors.py


def _docstring_tree() -> dict[str, Entry]:
    doc = errors.__doc__ or ""
    block = doc.split("::", 1)[1]
    entries: dict[str, Entry] = {}
    stack: list[str] = []  # stack[depth] = name of the last entry seen at that depth
    for line in block.splitlines():
        if not line.strip():
            continue
        match = _ENTRY.match(line.removeprefix("    "))
        assert match, f"errors.py tree line not understood: {line!r}"
        depth = len(match["prefix"]) // 4
        name = match["name"]
        assert name not in entries, f"{name} is listed twice in errors.py's tree"
        del stack[depth:]
        assert len(stack) == depth, f"{name} is indented below no parent in errors.py's tree"
        entries[name] = Entry(name, int(match["status"]), match["code"], stack[-1] if stack else None,
                              match["module"])
        stack.append(name)
    return entries


def _import_package() -> None:
    for module in pkgutil.walk_packages(remotecli.__path__, "remotecli."):
        name = module.name
        if name.startswith(SKIPPED_PREFIXES) or name.rsplit(".", 1)[-1] == "__main__":
            continue
        importlib.import_module(name)


def _subclasses(cls: type[RemotecliError]) -> list[type[RemotecliError]]:
    found: list[type[RemotecliError]] = []
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("remotecli."):
            found.append(sub)
        found.extend(_subclasses(sub))
    return found


def _package_errors() -> dict[str, type[RemotecliError]]:
    _import_package()
    classes: dict[str, type[RemotecliError]] = {"RemotecliError": RemotecliError}
    for cls in _subclasses(RemotecliError):
        other = classes.setdefault(cls.__name__, cls)
        assert other is cls, (f"two error classes share the name {cls.__name__} "
                              f"({other.__module__} and {cls.__module__}); the tree needs unique names")
    return classes


def test_tree_parses_and_has_the_root() -> None:
    tree = _docstring_tree()
    assert tree["RemotecliError"] == Entry("RemotecliError", 500, "internal_error", None, None)
    assert len(tree) > 40


def test_every_error_class_is_in_the_tree() -> None:
    tree = _docstring_tree()
    missing = sorted(f"{cls.__module__}.{name}" for name, cls in _package_errors().items() if name not in tree)
    assert not missing, f"error classes missing from errors.py's docstring tree: {missing}"


def test_tree_entries_match_their_classes() -> None:
    tree = _docstring_tree()
    classes = _package_errors()
    wrong: list[str] = []
    for name, entry in tree.items():
        cls = classes.get(name)
        if cls is None:
            wrong.append(f"{name}: listed in the tree but no such RemotecliError subclass exists")
            continue
        if (cls.http_status, cls.code) != (entry.status, entry.code):
            wrong.append(f"{name}: tree says {entry.status} {entry.code}, class has {cls.http_status} {cls.code}")
        parent = cls.__mro__[1].__name__ if cls is not RemotecliError else None
        if parent != entry.parent:
            wrong.append(f"{name}: tree puts it under {entry.parent}, class derives from {parent}")
        where = Path(inspect.getfile(cls)).relative_to(Path(remotecli.__file__).parent).as_posix()
        expected = None if where == "errors.py" else where
        if entry.module != expected:
            wrong.append(f"{name}: tree says it is defined in {entry.module or 'errors.py'}, "
                         f"it is in {expected or 'errors.py'} (write [{expected}] after its code)")
    assert not wrong, "errors.py's docstring tree disagrees with the classes:\n" + "\n".join(wrong)

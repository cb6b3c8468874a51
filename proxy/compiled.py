"""Which build of the hot modules this process runs: mypyc's extensions or the `.py` files.

setup.py compiles the modules on the per-request path into C extensions beside their
sources and records the sha256 of each source it compiled in MANIFEST. Python imports
an extension in preference to a `.py` of the same name, so `select` decides once, when
`proxy` is first imported and before any other module of it is:

- compiled: extensions are present and every source they came from is unchanged;
- pure Python: no extensions (no C compiler, or SDPROXY_PURE_PYTHON=1, at build time),
  SDPROXY_PURE_PYTHON=1 now, or a compiled module's source edited since the build (an
  editable install keeps the extensions beside the sources). An edit warns on stderr,
  naming the files and the rebuild command: stale compiled code never runs unnoticed.

All or nothing: compiled modules call each other's classes and constants directly, so
one module run from source beside the others compiled would not be the code that was
built or tested. To run from source, the path finder's cache gets, for each directory of
the package, a finder that knows only source files: the extensions stay on disk, unseen.
Stdlib only, never compiled itself: it runs before anything else in `proxy`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES, FileFinder, SourceFileLoader
from typing import NamedTuple

PURE_PYTHON = "SDPROXY_PURE_PYTHON"  # at build or run time: the .py files, not compiled
MANIFEST = "_compiled.sha256"  # in the package: `<sha256>  proxy/l7/parsers.py` lines
REBUILD = "`make build` (or `pip install -e .`)"


class Build(NamedTuple):
    compiled: tuple[str, ...]  # modules running compiled, by dotted name
    why_pure: str  # when none is: why (empty if nothing was compiled at all)
    stale: tuple[str, ...] = ()  # sources edited since they were compiled

    def describe(self) -> str:
        """`compiled: mypyc, 17 modules`, or `pure Python` with the reason."""
        if self.compiled:
            return f"compiled: mypyc, {len(self.compiled)} modules"
        return f"pure Python: {self.why_pure}" if self.why_pure else "pure Python"


def pure_python_requested() -> bool:
    return os.environ.get(PURE_PYTHON, "") not in ("", "0")


def select(package_path: Sequence[str]) -> Build:
    """Decide for the package at `package_path` (its `__path__`); see the module doc."""
    root = package_path[0]
    sources = _compiled_sources(root)
    if not sources:
        return Build((), "")
    if pure_python_requested():
        _hide_extensions(root)
        return Build((), f"{PURE_PYTHON}=1")
    stale = _changed_since_build(root, sources)
    if stale:
        _hide_extensions(root)
        print(f"sdproxy: {', '.join(stale)} changed since it was compiled: running pure "
              f"Python; rebuild with {REBUILD}", file=sys.stderr)
        return Build((), "sources changed since the build", tuple(stale))
    package = os.path.basename(root)
    return Build(tuple(sorted(_module_name(package, rel) for rel in sources)), "")


def _compiled_sources(root: str) -> list[str]:
    """The sources (relative to the package's parent, as MANIFEST has them) that have an
    extension beside them."""
    package = os.path.basename(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        names = set(filenames)
        for name in filenames:
            for suffix in EXTENSION_SUFFIXES:
                if name.endswith(suffix) and name[:-len(suffix)] + ".py" in names:
                    rel = os.path.relpath(os.path.join(dirpath, name[:-len(suffix)] + ".py"), root)
                    found.append(os.path.join(package, rel).replace(os.sep, "/"))
                    break
    return found


def _changed_since_build(root: str, sources: list[str]) -> list[str]:
    recorded: dict[str, str] = {}
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            for line in f:
                digest, _sep, path = line.rstrip("\n").partition("  ")
                recorded[path] = digest
    except OSError:
        pass  # no record: every extension is of unknown origin
    parent = os.path.dirname(root)
    changed = []
    for rel in sorted(sources):
        with open(os.path.join(parent, rel), "rb") as f:
            if recorded.get(rel) != hashlib.sha256(f.read()).hexdigest():
                changed.append(rel)
    return changed


def _hide_extensions(root: str) -> None:
    """Import every module of the package from its `.py` file (see the module doc)."""
    source_only = (SourceFileLoader, SOURCE_SUFFIXES)
    for dirpath, dirnames, _filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        # Keys as the import system derives them from `__path__`: os.path.join of the
        # parent's path and the directory name, which is what os.walk yields.
        sys.path_importer_cache[dirpath] = FileFinder(dirpath, source_only)


def _module_name(package: str, rel: str) -> str:
    name = rel[:-len(".py")].replace("/", ".")
    return name.removesuffix(".__init__")

"""proxy/compiled.py: the hot modules run compiled, or every module from its .py file.

The build under test is whatever this run installed: CI runs the suite compiled and the
unit suite again with SDPROXY_PURE_PYTHON=1. The selection rules themselves are tested on
a package made in a temporary directory, whose "extension" is junk: importing it would
fail, so a module that imports proves that its .py file was chosen.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import proxy
from proxy import BUILD, __version__, compiled

REPO = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = proxy.__path__[0]


def test_each_module_runs_as_the_build_says() -> None:
    sources = compiled._compiled_sources(PACKAGE_ROOT)
    names = {compiled._module_name("proxy", rel) for rel in sources}
    assert set(BUILD.compiled) <= names
    for name in sorted(names):
        path = importlib.import_module(name).__file__
        assert path is not None
        if name in BUILD.compiled:
            assert path.endswith(tuple(EXTENSION_SUFFIXES)), name
        else:
            assert path.endswith(".py"), name
    if compiled.pure_python_requested():
        assert not BUILD.compiled and not BUILD.stale


def test_version_with_pure_python_requested() -> None:
    env = {**os.environ, compiled.PURE_PYTHON: "1"}
    result = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=60, check=False)
    built = bool(compiled._compiled_sources(PACKAGE_ROOT))
    why = " (pure Python: SDPROXY_PURE_PYTHON=1)" if built else " (pure Python)"
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"sdproxy {__version__}{why}\n", "")


def test_describe() -> None:
    assert compiled.Build(("a", "b"), "").describe() == "compiled: mypyc, 2 modules"
    assert compiled.Build((), "").describe() == "pure Python"
    assert compiled.Build((), "SDPROXY_PURE_PYTHON=1").describe() == (
        "pure Python: SDPROXY_PURE_PYTHON=1")


# -- the rules, on a package of our own ---------------------------------------------------

PACKAGE = "sdproxy_compiled_probe"
SOURCE = "VALUE = 'from source'\n"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`<tmp>/PACKAGE/mod.py` with a junk extension beside it and a manifest that matches;
    importable, with the import system's caches restored afterwards."""
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    for rel in ("mod", "sub/deep"):
        (root / f"{rel}.py").write_text(SOURCE)
        (root / f"{rel}{EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    write_manifest(root, ["mod.py", "sub/deep.py"])
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(compiled.PURE_PYTHON, raising=False)
    yield root
    for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def write_manifest(root: Path, rels: list[str]) -> None:
    lines = [f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {PACKAGE}/{rel}\n"
             for rel in rels]
    (root / compiled.MANIFEST).write_text("".join(lines))


def imported_value(name: str) -> str:
    value = importlib.import_module(name).VALUE
    assert isinstance(value, str)
    return value


def test_extensions_of_unchanged_sources_are_used(package: Path) -> None:
    build = compiled.select([str(package)])
    assert build == compiled.Build((f"{PACKAGE}.mod", f"{PACKAGE}.sub.deep"), "")
    with pytest.raises(ImportError):  # the junk extension is what Python picks
        importlib.import_module(f"{PACKAGE}.mod")


def test_pure_python_requested_hides_every_extension(
        package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.PURE_PYTHON, "1")
    build = compiled.select([str(package)])
    assert build == compiled.Build((), "SDPROXY_PURE_PYTHON=1")
    assert build.describe() == "pure Python: SDPROXY_PURE_PYTHON=1"
    assert imported_value(f"{PACKAGE}.mod") == "from source"
    assert imported_value(f"{PACKAGE}.sub.deep") == "from source"


def test_zero_is_not_a_request(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.PURE_PYTHON, "0")
    assert compiled.select([str(package)]).compiled == (f"{PACKAGE}.mod", f"{PACKAGE}.sub.deep")


def test_an_edited_source_runs_all_from_source_and_says_so(
        package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (package / "sub" / "deep.py").write_text("VALUE = 'edited'\n")
    build = compiled.select([str(package)])
    assert build == compiled.Build((), "sources changed since the build",
                                   (f"{PACKAGE}/sub/deep.py",))
    err = capsys.readouterr().err
    assert f"{PACKAGE}/sub/deep.py changed since it was compiled" in err
    assert compiled.REBUILD in err
    # All or nothing: the unchanged module runs from source too.
    assert imported_value(f"{PACKAGE}.mod") == "from source"
    assert imported_value(f"{PACKAGE}.sub.deep") == "edited"


def test_extensions_without_a_manifest_are_not_trusted(
        package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (package / compiled.MANIFEST).unlink()
    build = compiled.select([str(package)])
    assert build.stale == (f"{PACKAGE}/mod.py", f"{PACKAGE}/sub/deep.py")
    assert "running pure Python" in capsys.readouterr().err
    assert imported_value(f"{PACKAGE}.mod") == "from source"


def test_no_extensions_is_plain_pure_python(package: Path) -> None:
    for path in package.rglob(f"*{EXTENSION_SUFFIXES[0]}"):
        path.unlink()
    assert compiled.select([str(package)]) == compiled.Build((), "")
    assert imported_value(f"{PACKAGE}.mod") == "from source"

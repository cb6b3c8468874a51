"""Builds sdproxy with its hot modules compiled by mypyc, or as pure Python.

The modules on the per-request path (HOT_MODULES) become C extensions beside their
`.py` files: the same source, 2.3 times fewer instructions per proxied request.
The extensions are optional: without a C compiler the install still succeeds and runs
the `.py` files; `SDPROXY_PURE_PYTHON=1` at build time skips compiling altogether.

Beside the extensions goes BUILD_MANIFEST, the sha256 of each source as compiled:
`proxy/compiled.py` checks it at import and runs pure Python, with a warning, when a
compiled module's source changed since, so an edit never runs stale compiled code.
Everything else (metadata, dependencies) is in pyproject.toml.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES

from setuptools import Extension, setup

# Each passes `mypy --strict` and the whole test suite compiled. Left out: the cold
# modules (config, discovery, admin, TCP mode), and proxy/l7/parsers_h11.py, the fallback
# parser (`http_parser = "h11"`): off the default path, and the reference the
# differential tests hold llhttp to, so it stays the plain Python it was reviewed as.
HOT_MODULES = [
    "proxy/l7/exchange.py",
    "proxy/l7/framing.py",
    "proxy/l7/hashkey.py",
    "proxy/l7/headers.py",
    "proxy/l7/message.py",
    "proxy/l7/parsers.py",
    "proxy/protocols/http.py",
    "proxy/protocols/http_exchange.py",
    "proxy/protocols/http_upstream.py",
    "proxy/routing.py",
    "proxy/upstream/breaker.py",
    "proxy/upstream/host.py",
    "proxy/upstream/balancers/__init__.py",
    "proxy/upstream/balancers/hash.py",
    "proxy/upstream/balancers/least_conn.py",
    "proxy/upstream/balancers/p2c.py",
    "proxy/upstream/balancers/random_pick.py",
    "proxy/upstream/balancers/round_robin.py",
]
BUILD_MANIFEST = "proxy/_compiled.sha256"  # read by proxy/compiled.py
PURE_PYTHON = "SDPROXY_PURE_PYTHON"
# The setup.py commands that build extensions. pip also runs this file for metadata
# (egg_info, dist_info): compiling there too would triple the install time.
BUILD_COMMANDS = frozenset(("build", "build_ext", "bdist_wheel", "editable_wheel", "develop",
                            "install"))


def write_manifest(paths: list[str]) -> None:
    """`sha256sum` format: one `<hex digest>  <path>` line per compiled source."""
    lines = []
    for path in paths:
        with open(path, "rb") as f:
            lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {path}\n")
    with open(BUILD_MANIFEST, "w") as f:
        f.writelines(lines)


def remove_inplace_extensions() -> None:
    """Extensions an earlier editable build left beside the sources: a pure editable
    build stands for the .py files, so they go (else every run would warn of them)."""
    for path in HOT_MODULES:
        for suffix in EXTENSION_SUFFIXES:
            if os.path.exists(path[:-len(".py")] + suffix):
                os.remove(path[:-len(".py")] + suffix)
    for shared in glob.glob("*__mypyc.*"):
        if any(shared.endswith(suffix) for suffix in EXTENSION_SUFFIXES):
            os.remove(shared)


def compiled_extensions() -> list[Extension]:
    if not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return []
    if os.environ.get(PURE_PYTHON, "") not in ("", "0"):
        write_manifest([])
        if {"editable_wheel", "develop"}.intersection(sys.argv[1:]):
            remove_inplace_extensions()
        return []
    from mypyc.build import mypycify

    # Hashed before compiling: a source edited meanwhile no longer matches, and is then
    # run as pure Python rather than as compiled code of another version.
    write_manifest(HOT_MODULES)
    extensions = mypycify(HOT_MODULES, opt_level="3")
    for extension in extensions:
        extension.optional = True  # no C compiler: the install goes on, pure Python
    return extensions


setup(ext_modules=compiled_extensions())

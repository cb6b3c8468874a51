"""proxy.logs (sdproxy's own event lines, logfmt and JSON) and the `[log]` config section."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from support.procs import parse_logfmt

from proxy.config import ConfigError, LogConfig, load
from proxy.logs import JsonFormatter, LogfmtFormatter, parse_message


def record(message: str, *args: object, level: int = logging.INFO,
           exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("sdproxy.test", level, __file__, 1, message, args, exc_info)
    rec.created = 1764646800.25
    rec.msecs = 250.0
    return rec


def test_logfmt_line() -> None:
    line = LogfmtFormatter().format(record("event=listening upstream=%s listen=%s", "web",
                                           "127.0.0.1:8081"))
    assert line == ("ts=2025-12-02T03:40:00.250Z level=info event=listening upstream=web "
                    "listen=127.0.0.1:8081")


def test_json_line_carries_the_message_fields() -> None:
    line = JsonFormatter().format(record('event=reload_rejected config=%s problems="%s"',
                                         "a.toml", "x: bad; y: worse", level=logging.ERROR))
    assert json.loads(line) == {"ts": "2025-12-02T03:40:00.250Z", "level": "error",
                                "event": "reload_rejected", "config": "a.toml",
                                "problems": "x: bad; y: worse"}


@pytest.mark.parametrize("message", [
    "Task exception was never retrieved",  # a third-party line: no fields at all
    "event=connect_error error='connection refused'",  # a value with a space, unquoted
])
def test_json_keeps_a_message_that_is_not_clean_logfmt(message: str) -> None:
    fields = json.loads(JsonFormatter().format(record(message)))
    assert fields["msg"] == message and fields["level"] == "info"


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), JsonFormatter()],
                         ids=["logfmt", "json"])
def test_a_traceback_stays_on_one_line(formatter: logging.Formatter) -> None:
    line = formatter.format(record("event=exchange_error upstream=web", exc=True))
    assert "\n" not in line
    fields = json.loads(line) if isinstance(formatter, JsonFormatter) else parse_logfmt(line)
    assert "ValueError: boom" in fields["exc"] and fields["event"] == "exchange_error"


def test_parse_message() -> None:
    assert parse_message('event=a b="x \\"y\\"" c=') == ({"event": "a", "b": 'x "y"', "c": ""},
                                                        True)
    assert parse_message("plain words") == ({}, False)


# -- [log] in the config -------------------------------------------------------------------


def load_log(tmp_path: Path, text: str) -> LogConfig:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text)
    return load(str(path), {}).log


def test_log_defaults(tmp_path: Path) -> None:
    assert load_log(tmp_path, "") == LogConfig(level="info", format="logfmt", access="off",
                                               access_format="logfmt")


def test_log_section(tmp_path: Path) -> None:
    cfg = load_log(tmp_path, '[log]\nlevel = "debug"\nformat = "json"\n'
                             'access = "/var/log/sdproxy/access.log"\naccess_format = "json"\n')
    assert cfg == LogConfig("debug", "json", "/var/log/sdproxy/access.log", "json")


def test_log_problems_name_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "sdproxy.toml"
    path.write_text('[log]\nlevel = "verbose"\nformat = "xml"\naccess = ""\n'
                    'access_format = 1\nacess = "stdout"\n')
    with pytest.raises(ConfigError) as e:
        load(str(path), {})
    assert e.value.problems == [
        f'{path}: log.level: must be one of debug, info, warning, error; got "verbose"',
        f'{path}: log.format: must be one of logfmt, json; got "xml"',
        f"{path}: log.access: must not be empty",
        f"{path}: log.access_format: expected a string, got integer",
        f"{path}: log.acess: unknown key",
    ]


def test_example_config_spells_out_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "example.toml"
    assert load(str(example), {}).log == LogConfig()


def test_log_level_from_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    """`sdproxy run --log-level` sets $SDPROXY_LOG_LEVEL, so that reloads and workers keep it."""
    path = tmp_path / "sdproxy.toml"
    path.write_text('[log]\nlevel = "error"\n')
    assert load(str(path), {"SDPROXY_LOG_LEVEL": "debug"}).log.level == "debug"
    assert load(str(path), {"SDPROXY_LOG_LEVEL": ""}).log.level == "error"
    with pytest.raises(ConfigError) as e:
        load(str(path), {"SDPROXY_LOG_LEVEL": "loud"})
    assert e.value.problems == [
        f'{path}: $SDPROXY_LOG_LEVEL: must be one of debug, info, warning, error; got "loud"']

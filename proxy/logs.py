"""sdproxy's own event log: one line per event on stderr, logfmt or JSON.

Every event is logged as a logfmt message, `event=NAME key=value ...`; this module adds
`ts` and `level` in front and, with `format = "json"`, turns the message into one JSON
object per line (`{"ts": ..., "level": ..., "event": ..., "key": "value", ...}`). A
message that is not clean logfmt (a third-party library's text, a value with spaces
written without quotes) keeps its parsed fields and gains `msg` with the whole text, so
nothing is lost. Tracebacks are folded into the line (`exc`): one event, one line.

`setup` may run again (a SIGHUP reload with another `[log]`): it replaces the handler.
The access log is another module's (accesslog.py): it never goes through `logging`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Final

LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# key=value with value either "quoted, with \\ escapes" or a run of non-space characters.
_PAIR: Final = re.compile(r'([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|$)')
_QUOTED_ESCAPE: Final = re.compile(r"\\(.)")


def utc_timestamp(created: float) -> str:
    """`2026-12-02T03:40:00.123Z`: UTC, milliseconds."""
    whole = int(created)
    ms = int((created - whole) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{ms:03d}Z"


def parse_message(message: str) -> tuple[dict[str, str], bool]:
    """The logfmt pairs of `message` and whether they are all of it (bar spaces)."""
    fields: dict[str, str] = {}
    for match in _PAIR.finditer(message):
        key, raw = match.group(1), match.group(2)
        if raw.startswith('"'):
            raw = _QUOTED_ESCAPE.sub(r"\1", raw[1:-1])
        fields[key] = raw
    return fields, bool(fields) and not _PAIR.sub("", message).strip()


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=... <message>`."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={utc_timestamp(record.created)} level={record.levelname.lower()} " \
               f"{record.getMessage()}"
        if record.exc_info:
            # Keep one line per event: the traceback is folded into a quoted field, its
            # quotes and line breaks escaped (a traceback quotes every file name).
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, then the message's fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields, whole = parse_message(message)
        out: dict[str, str] = {"ts": utc_timestamp(record.created),
                               "level": record.levelname.lower()}
        for key, value in fields.items():
            out.setdefault(key, value)  # a message's own "ts" or "level" does not win
        if not whole:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


FORMATTERS: Final[dict[str, type[logging.Formatter]]] = {
    "logfmt": LogfmtFormatter,
    "json": JsonFormatter,
}


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    """Send every log record at `level` or above to stderr, one line each in `fmt`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

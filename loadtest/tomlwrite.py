"""Write TOML from Python values (the standard library only reads it).

Owns the text of one value, one key and one `[table]`; knows nothing of what the tables
mean. Shared by the load tests and the integration tests' config writer
(`tests/support/tomlconf.py`), so sdproxy configs are written one way everywhere.
Strings are JSON strings: JSON's escapes are valid TOML basic-string escapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def toml_value(value: Any) -> str:
    """One TOML value: strings, bools, numbers, arrays and (inline) tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, Mapping):
        inner = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def toml_key(key: str) -> str:
    """A bare key when it may be one, else a quoted key."""
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return json.dumps(key)


def toml_table(header: str, values: Mapping[str, Any]) -> str:
    """`header` (e.g. "[admin]" or "[[upstreams]]") and one `key = value` line per item."""
    lines = [header]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"

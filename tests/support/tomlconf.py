"""Write sdproxy TOML configs from Python values (the stdlib only reads TOML).

`build_config` guarantees its output parses with `tomllib` and contains `[admin]` and
`[consul]` sections pointing where the caller said, so a proxy started with it talks to
the test's Consul agent and serves its admin API on a known port.
"""

from __future__ import annotations

import json
import tomllib
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
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return json.dumps(key)


def toml_table(header: str, values: Mapping[str, Any]) -> str:
    lines = [header]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def build_config(
    upstreams: Mapping[str, Mapping[str, Any]] | str,
    *,
    admin_listen: str,
    consul: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    listen_for: Any = None,
) -> str:
    """A complete config text.

    `upstreams` is either a mapping `name -> upstream keys` (each without `listen` gets
    one from `listen_for(name)`) or a TOML text fragment; a fragment without its own
    `[admin]`/`[consul]`/`[defaults]` section gets the generated one. The result is
    checked with `tomllib.loads` before it is returned.
    """
    if isinstance(upstreams, str):
        parts = []
        if "[admin]" not in upstreams:
            parts.append(toml_table("[admin]", {"listen": admin_listen}))
        if "[consul]" not in upstreams:
            parts.append(toml_table("[consul]", consul))
        if defaults and "[defaults]" not in upstreams:
            parts.append(toml_table("[defaults]", defaults))
        parts.append(upstreams)
        text = "\n".join(parts)
    else:
        parts = [toml_table("[admin]", {"listen": admin_listen}), toml_table("[consul]", consul)]
        if defaults:
            parts.append(toml_table("[defaults]", defaults))
        for name, options in upstreams.items():
            values: dict[str, Any] = {"name": name}
            values.update(options)
            if "listen" not in values:
                if listen_for is None:
                    raise ValueError(f"upstream {name}: no listen and no listen_for")
                values["listen"] = listen_for(name)
            parts.append(toml_table("[[upstreams]]", values))
        text = "\n".join(parts)
    tomllib.loads(text)  # our own writer must never hand the proxy broken TOML
    return text

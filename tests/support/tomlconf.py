"""Write sdproxy TOML configs from Python values (the stdlib only reads TOML).

The value, key and table writers are the load tests' (`loadtest.tomlwrite`), re-exported
here, so a config is written the same way by both.

`build_config` guarantees its output parses with `tomllib` and contains `[admin]` and
`[consul]` sections pointing where the caller said, so a proxy started with it talks to
the test's Consul agent and serves its admin API on a known port.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from loadtest.tomlwrite import toml_key, toml_table, toml_value

__all__ = ["build_config", "toml_key", "toml_table", "toml_value"]


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

"""Who may change state through the admin API (drain/enable): the rules, no I/O.

Rules (SPEC "Admin (additions)"):
- With `admin.token` set, every write needs `Authorization: Bearer <token>`, whatever
  the listen address (compared in constant time).
- Without a token, writes are allowed only when `admin.listen` is a loopback address
  (127.0.0.0/8, ::1, "localhost"): anyone who can reach it is on this host already.
  Any other host name counts as not loopback: where it points may change.
  A non-loopback admin without a token stays read-only: 403 says to set the token.
- A write a browser sends on behalf of another site is refused (403) whatever the
  token: `Sec-Fetch-Site: cross-site`, or an `Origin` that is not the admin's own. A
  page on the Web must not be able to drain instances through a browser on this host.
Reads (`/upstreams`, `/metrics`, `/`) are never restricted here.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from proxy.config import AdminConfig


class Refusal(NamedTuple):
    status: int
    message: str


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another name: it may point anywhere tomorrow
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _cross_site(headers: Mapping[str, str], own_host: str) -> bool:
    if headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = headers.get("Origin")
    if origin is None:
        return False  # not a browser, or a same-origin request of an older one
    return urlsplit(origin).netloc.lower() != own_host.lower()


def refuse_write(admin: AdminConfig, headers: Mapping[str, str],
                 own_host: str) -> Refusal | None:
    """None when the write may go ahead, else the status and message to answer.

    `own_host` is the request's Host header (what a same-origin Origin carries)."""
    if _cross_site(headers, own_host):
        return Refusal(403, "cross-site request refused")
    if admin.token:
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), admin.token.encode()):
            return Refusal(401, "a valid admin token is needed (Authorization: Bearer ...)")
        return None
    if not is_loopback(admin.listen.host):
        return Refusal(403, "admin.listen is not a loopback address: set admin.token to "
                            "allow drain/enable")
    return None

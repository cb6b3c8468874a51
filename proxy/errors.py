"""Error types that carry the HTTP status they map to.

Raised by logic modules and caught at one boundary (the protocol shell), which turns
them into a short text response naming the upstream.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A failure sdproxy answers itself, with `status` and a short reason."""

    status = 502
    reason = "Bad Gateway"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class BadRequest(ProxyError):
    status = 400
    reason = "Bad Request"


class HeaderTimeout(ProxyError):
    status = 408
    reason = "Request Timeout"


class HeaderTooLarge(ProxyError):
    status = 431
    reason = "Request Header Fields Too Large"


class NoInstanceReachable(ProxyError):
    status = 502
    reason = "Bad Gateway"


class NoPassingInstance(ProxyError):
    status = 503
    reason = "Service Unavailable"


class TooManyConnections(ProxyError):
    status = 503
    reason = "Service Unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "Gateway Timeout"


STATUS_REASONS: dict[int, bytes] = {
    cls.status: cls.reason.encode()
    for cls in (BadRequest, HeaderTimeout, HeaderTooLarge, NoInstanceReachable,
                NoPassingInstance, UpstreamTimeout)
}

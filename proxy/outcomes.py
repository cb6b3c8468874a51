"""How one attempt at an upstream instance ended: small ints, one label each.

Owns the outcome codes HTTP and TCP share, their labels (the `reason` of
`sdproxy_failovers_total`, /upstreams' `failovers` and the access log), and the map from
the labels `retry_on` accepts to codes. The request path compares and indexes ints; the
label strings are looked up only where a metric or a log line needs one.
"""

from __future__ import annotations

from typing import Final

DONE: Final = 0  # the response (or the TCP connection) went to the client
ABORTED: Final = 1  # the client left first: nobody's failure
CONNECT_FAILURE: Final = 2  # refused, reset or timed out while connecting: nothing was sent
RESET: Final = 3  # the connection broke after the request was (partly) sent
TIMEOUT: Final = 4  # no response head within request_timeout
STATUS_502: Final = 5  # a 5xx response listed in retry_on, discarded for a retry
STATUS_503: Final = 6
STATUS_504: Final = 7

# Indexed by outcome code. The strings are the config's `retry_on` names and the
# metrics' reasons, so existing dashboards keep their labels.
LABELS: Final[tuple[str, ...]] = ("done", "aborted", "connect-failure", "reset", "timeout",
                                  "502", "503", "504")
BY_LABEL: Final[dict[str, int]] = {label: code for code, label in enumerate(LABELS)}
# A response status that is a retryable outcome when `retry_on` lists it.
BY_STATUS: Final[dict[int, int]] = {502: STATUS_502, 503: STATUS_503, 504: STATUS_504}


def mask_of(labels: tuple[str, ...] | frozenset[str]) -> int:
    """The outcomes named in `labels` (config `retry_on`) as a bit set: bit `1 << code`.
    Unknown names are ignored: config.py validates them."""
    mask = 0
    for label in labels:
        code = BY_LABEL.get(label)
        if code is not None:
            mask |= 1 << code
    return mask

"""Decisions of one proxied exchange that do not depend on I/O: retries and limits.

Rules (SPEC, "HTTP mode"):
- a failed connect (refused, reset, timeout) is retried on another instance, any method;
- a reset, a request_timeout or a listed 502/503/504 after the request was sent is
  retried only for idempotent methods and only while the request body can be replayed;
- never more than `retries` further attempts, never twice on one instance (the caller
  excludes tried hosts when it picks).
`UpstreamRuntime.should_retry` applies these, with the instances left and the retry
budget, for HTTP and TCP alike.
"""

from __future__ import annotations

from typing import Final

from proxy.l7.message import IDEMPOTENT_METHODS
from proxy.outcomes import CONNECT_FAILURE as CONNECT_FAILURE_CODE

# outcomes.LABELS of those outcomes, which protocols/http_exchange.py still passes around
# as strings until it moves to proxy.outcomes' codes.
CONNECT_FAILURE: Final = "connect-failure"
RESET: Final = "reset"
TIMEOUT: Final = "timeout"

# Request body bytes kept for replay on another instance; a longer body is streamed
# once and its request is not retried after it was sent.
REPLAY_LIMIT: Final = 64 * 1024
# Unsent request body bytes buffered before we stop reading from the client.
BODY_HIGH_WATER: Final = 256 * 1024


def may_retry(outcome: int, *, method: bytes, replayable: bool, attempt: int, retries: int,
              retry_on: int) -> bool:
    """Whether attempt number `attempt` (1-based) that failed with `outcome`
    (proxy.outcomes) is retried; `retry_on` is the config's list as a bit set
    (outcomes.mask_of)."""
    if attempt > retries or not retry_on >> outcome & 1:
        return False
    if outcome == CONNECT_FAILURE_CODE:
        return True
    return replayable and method in IDEMPOTENT_METHODS

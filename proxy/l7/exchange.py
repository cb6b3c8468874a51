"""Decisions of one proxied exchange that do not depend on I/O: retries and limits.

Rules (SPEC, "HTTP mode"):
- a failed connect (refused, reset, timeout) is retried on another instance, any method;
- a reset, a request_timeout or a listed 502/503/504 after the request was sent is
  retried only for idempotent methods and only while the request body can be replayed;
- never more than `retries` further attempts, never twice on one instance (the caller
  excludes tried hosts when it picks).
"""

from __future__ import annotations

from typing import Final

from proxy.l7.message import IDEMPOTENT_METHODS

CONNECT_FAILURE: Final = "connect-failure"
RESET: Final = "reset"
TIMEOUT: Final = "timeout"

# Request body bytes kept for replay on another instance; a longer body is streamed
# once and its request is not retried after it was sent.
REPLAY_LIMIT: Final = 64 * 1024
# Unsent request body bytes buffered before we stop reading from the client.
BODY_HIGH_WATER: Final = 256 * 1024


def may_retry(kind: str, *, method: bytes, replayable: bool, attempt: int, retries: int,
              retry_on: frozenset[str]) -> bool:
    """Whether attempt number `attempt` (1-based) that failed with `kind` is retried."""
    if attempt > retries or kind not in retry_on:
        return False
    if kind == CONNECT_FAILURE:
        return True
    return replayable and method in IDEMPOTENT_METHODS

"""Every metric sdproxy exposes, declared once, next to its meaning.

This module is the catalogue, not the bookkeeping: the request path counts in plain ints
on `Host` and `UpstreamRuntime`, and `proxy.admin.collector` turns those ints into
Prometheus families at scrape time, using only the names, kinds, labels and help text
declared here. So a metric is renamed or documented in one place, tests assert against
these constants, and no request ever calls into a metrics library.

Invariants: names follow Prometheus conventions (`sdproxy_` prefix, `_total` on counters,
base units: seconds, bytes); each name appears once in `ALL`.

Under `--workers N` (SPEC "Workers") every process answers for all of them: counters and
histograms are summed over the workers (those that died included, so a sum never goes
down), gauges are given per worker with one more label, WORKER_LABEL. `BUILD_INFO` and
`WORKER_EXITS` are the process-wide exceptions: the first is the same in every worker,
the second is about the workers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str


# --- traffic, per instance -------------------------------------------------------------
REQUESTS = Metric(
    "sdproxy_requests_total", "counter", ("upstream", "endpoint", "code"),
    "HTTP responses received from an instance, by status code.")
ENDPOINT_REQUESTS = Metric(
    "sdproxy_endpoint_requests_total", "counter", ("upstream", "endpoint"),
    "Attempts sent to an instance (http: requests, tcp: connections), retries included.")
ENDPOINT_FAILURES = Metric(
    "sdproxy_endpoint_failures_total", "counter", ("upstream", "endpoint"),
    "Attempts that failed: connect failure, reset, timeout, or a 5xx listed in retry_on.")
ACTIVE_REQUESTS = Metric(
    "sdproxy_active_requests", "gauge", ("upstream", "endpoint"),
    "Requests (http) or connections (tcp) in flight to an instance.")

# --- listeners ---------------------------------------------------------------------------
CONNECTIONS = Metric(
    "sdproxy_connections", "gauge", ("upstream",),
    "Client connections open on the upstream's listener.")
REJECTED_CONNECTIONS = Metric(
    "sdproxy_rejected_connections_total", "counter", ("upstream",),
    "Client connections refused because max_connections was reached.")

# --- routing decisions -----------------------------------------------------------------
FAILOVERS = Metric(
    "sdproxy_failovers_total", "counter", ("upstream", "reason"),
    "Retries on another instance, by the reason the previous attempt failed.")
NO_INSTANCE_RESPONSES = Metric(
    "sdproxy_no_instance_responses_total", "counter", ("upstream",),
    "Requests answered by sdproxy itself because no passing instance was left (503).")
REQUEST_DURATION = Metric(
    "sdproxy_request_duration_seconds", "histogram", ("upstream",),
    "Time from a request's head arriving until its response ended, retries included.")
REQUESTS_IN_FLIGHT = Metric(
    "sdproxy_requests_in_flight", "gauge", ("upstream",),
    "Requests (http) or connections (tcp) being served by the upstream.")
RETRIES_IN_FLIGHT = Metric(
    "sdproxy_retries_in_flight", "gauge", ("upstream",),
    "Retry attempts in flight, bounded by the retry budget.")
RETRY_BUDGET_EXHAUSTED = Metric(
    "sdproxy_retry_budget_exhausted_total", "counter", ("upstream",),
    "Retries not made because retries in flight reached the retry budget.")

ROUTE_REQUESTS = Metric(
    "sdproxy_route_requests_total", "counter", ("listen", "host", "path_prefix", "upstream"),
    "Requests a route of a [[listeners]] entry took (host \"\" = any host). Bounded: one "
    "label set per configured or tagged route; requests no route took are the listener's "
    "404s in sdproxy_responses_total{upstream=\"listener ADDR\"}.")

# --- what clients got, per upstream ----------------------------------------------------
RESPONSES = Metric(
    "sdproxy_responses_total", "counter", ("upstream", "code"),
    "Responses sent to clients, by the status code they got: an instance's, or sdproxy's "
    "own (400, 408, 431, 502, 503, 504).")
BYTES_IN = Metric(
    "sdproxy_bytes_in_total", "counter", ("upstream",),
    "Bytes received from clients (http: request heads and bodies; tcp: the stream).")
BYTES_OUT = Metric(
    "sdproxy_bytes_out_total", "counter", ("upstream",),
    "Bytes sent to clients (http: response heads and bodies; tcp: the stream).")

# --- instance health ---------------------------------------------------------------------
BREAKER_STATE = Metric(
    "sdproxy_breaker_state", "gauge", ("upstream", "endpoint", "state"),
    "1 for the instance's current circuit-breaker state (closed, open, half_open), "
    "0 for the others.")
ENDPOINTS = Metric(
    "sdproxy_endpoints", "gauge", ("upstream", "state"),
    "Instances known to the upstream, by state "
    "(healthy, open, half_open, ejected, draining).")

BREAKER_TRANSITIONS = Metric(
    "sdproxy_breaker_transitions_total", "counter", ("upstream", "state"),
    "Circuit-breaker transitions of the upstream's instances, by the state entered.")
PANIC_PICKS = Metric(
    "sdproxy_panic_picks_total", "counter", ("upstream",),
    "Attempts sent to an instance whose breaker was open because every instance's was "
    "(the panic rule: probe rather than switch the upstream off).")

# --- catalog -----------------------------------------------------------------------------
CATALOG_UPDATES = Metric(
    "sdproxy_catalog_updates_total", "counter", ("upstream",),
    "Successful catalog answers applied to the pool.")
CATALOG_ERRORS = Metric(
    "sdproxy_catalog_errors_total", "counter", ("upstream",),
    "Failed catalog queries (the last known pool keeps serving).")
CATALOG_STALE = Metric(
    "sdproxy_catalog_stale_seconds", "gauge", ("upstream",),
    "0 while the catalog answers; seconds since the last successful answer once it fails.")
CATALOG_LAST_UPDATE = Metric(
    "sdproxy_catalog_last_update_timestamp_seconds", "gauge", ("upstream",),
    "Unix time of the last successful catalog answer (absent before the first one).")
CATALOG_ANSWERED = Metric(
    "sdproxy_catalog_answered", "gauge", ("upstream",),
    "1 once the upstream's catalog answered at least once (what /ready waits for).")

# --- the processes -----------------------------------------------------------------------
BUILD_INFO = Metric(
    "sdproxy_build_info", "gauge", ("version", "python", "parser"),
    "Always 1; the labels name sdproxy's version, the Python running it and the HTTP "
    "parser library.")
WORKER_EXITS = Metric(
    "sdproxy_worker_exits_total", "counter", ("worker",),
    "Workers that ended other than by the supervisor's stop (each was restarted), by "
    "worker number (--workers N only).")

# The label that tells the workers' gauges apart under `--workers N`.
WORKER_LABEL = "worker"

ALL: tuple[Metric, ...] = (
    REQUESTS, ENDPOINT_REQUESTS, ENDPOINT_FAILURES, ACTIVE_REQUESTS,
    CONNECTIONS, REJECTED_CONNECTIONS,
    FAILOVERS, NO_INSTANCE_RESPONSES, REQUEST_DURATION, ROUTE_REQUESTS,
    REQUESTS_IN_FLIGHT, RETRIES_IN_FLIGHT, RETRY_BUDGET_EXHAUSTED,
    BREAKER_STATE, ENDPOINTS, BREAKER_TRANSITIONS, PANIC_PICKS,
    CATALOG_UPDATES, CATALOG_ERRORS, CATALOG_STALE, CATALOG_LAST_UPDATE, CATALOG_ANSWERED,
    RESPONSES, BYTES_IN, BYTES_OUT, BUILD_INFO, WORKER_EXITS,
)

# The metrics given per worker under `--workers N`: every gauge but the build's.
PER_WORKER = frozenset(x.name for x in ALL if x.kind == "gauge" and x is not BUILD_INFO)

# Host states as the admin API names them (SPEC "Admin API"), and the breaker state each
# implies. Ejection and draining are not breaker states: the breaker of such a host has
# not tripped, so it reads as closed.
HOST_STATES = ("healthy", "open", "half_open", "ejected", "draining")
BREAKER_STATES = ("closed", "open", "half_open")
BREAKER_STATE_OF_HOST = {"healthy": "closed", "open": "open", "half_open": "half_open"}

"""Helpers for the tests: real processes on loopback, a raw HTTP client, stand-ins.

- `procs`: the demo backend and the proxy as subprocesses (own process groups, bounded
  waits, killed at teardown by the fixtures in `tests/conftest.py`).
- `consul`: registering backends in the shared dev agent and waiting for the catalog.
- `tomlconf`: writing sdproxy TOML configs from dicts.
- `http`: a minimal HTTP/1.x client on asyncio streams that never retries and can send
  malformed bytes, and a paced request loop.
- `watch`: a recording catalog sink and the watcher-task helpers of the discovery tests.
- `dnsmsg`: DNS responses written as text (dnspython objects), for DNS discovery tests.
- `fakes`: a hand-stepped clock and the application state the admin API reads.

Import as `from support import ...` (`tests/conftest.py` puts `tests/` on `sys.path`).
"""

from support.consul import Registration, register_backend, unique_service, wait_passing
from support.http import RawConnection, Response, Sample, fetch, paced_requests
from support.procs import Backend, ProxyProcess, ProxyStartError, launch_backends, launch_proxy

__all__ = [
    "Backend", "ProxyProcess", "ProxyStartError", "RawConnection", "Registration", "Response",
    "Sample", "fetch", "launch_backends", "launch_proxy", "paced_requests", "register_backend",
    "unique_service", "wait_passing",
]

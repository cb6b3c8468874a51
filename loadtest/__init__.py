"""Load tests: real processes on loopback (Consul agent, backends, proxies), one report
per scenario, an optional timeline plot. `python -m loadtest SCENARIO --help`."""

"""`python -m loadtest SCENARIO [options]`: run one load-test scenario and print its report.

Each scenario is a module `loadtest/scenarios/<name>.py` (dashes become underscores)
exposing `DESCRIPTION: str`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SCENARIOS = ("throughput", "failover", "hang", "churn", "dns-vs-proxy", "catalog", "soak", "abuse",
             "routes", "tagroutes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest",
                                     description="sdproxy load tests on loopback")
    sub = parser.add_subparsers(dest="scenario", required=True)
    modules = {}
    for name in SCENARIOS:
        module = importlib.import_module(f"loadtest.scenarios.{name.replace('-', '_')}")
        modules[name] = module
        p = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        p.add_argument("--plot", metavar="FILE.png", help="draw the timeline into this file")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.scenario].run(args))


if __name__ == "__main__":
    sys.exit(main())

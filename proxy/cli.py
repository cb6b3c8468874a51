"""Command line: argv -> config.load() -> uvloop -> app.run().

Exit codes (SPEC): 0 clean stop, 2 bad config or usage, 1 any other failure. User errors
print one message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from proxy import BUILD, __version__
from proxy import config as config_mod


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2, as argparse does
        self.print_usage(sys.stderr)
        self.exit(2, f"sdproxy: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdproxy", description="service-discovery-aware load-balancing proxy")
    # Which build runs (proxy/compiled.py): "(compiled: mypyc, 17 modules)" or "(pure Python)".
    parser.add_argument("--version", action="version",
                        version=f"sdproxy {__version__} ({BUILD.describe()})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, metavar="FILE")
    run.add_argument("--workers", type=int, default=1, metavar="N")
    run.add_argument("--log-level", choices=config_mod.LOG_LEVELS, default=None,
                     help="level of sdproxy's own log lines; wins over [log] level "
                          "(sets $SDPROXY_LOG_LEVEL)")
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    demo = sub.add_parser("demo", help="start a registry, three backends and the proxy; "
                                       "kill one")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds of traffic")
    demo.add_argument("--rate", type=float, default=200.0, help="requests per second")
    demo.add_argument("--registry", choices=("consul", "etcd", "zookeeper"), default="consul",
                      help="the registry the backends register in (default consul)")
    return parser


def load_config(path: str) -> config_mod.Config | None:
    try:
        return config_mod.load(path, os.environ)
    except config_mod.ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def prefer_lean_extensions() -> None:
    """Choose third-party implementations for RSS; must run before aiohttp is imported.

    frozenlist's compiled FrozenList is C++ and loads libstdc++ (about 1 MiB of idle RSS;
    the target is 40 MiB). aiohttp uses FrozenList only for signal and middleware lists,
    never per proxied byte, and the pure-Python one has the same API. `setdefault`: an
    explicit FROZENLIST_NO_EXTENSIONS (even empty, to keep the C++ one) wins.
    """
    os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return 0 if load_config(args.config) is not None and print("ok") is None else 2
    if args.command == "run":
        if args.workers < 1:
            print("sdproxy: --workers must be at least 1", file=sys.stderr)
            return 2
        if args.log_level is not None:
            # Through the environment, so that every load of the config (a reload, a
            # worker's) keeps it: proxy.config reads it over [log] level.
            os.environ[config_mod.LOG_LEVEL_ENV] = args.log_level
        cfg = load_config(args.config)
        if cfg is None:
            return 2
        prefer_lean_extensions()
        from proxy import app

        return app.main(cfg, workers=args.workers)
    if args.command == "demo":
        from proxy.demo import run as demo_run

        return demo_run.main(duration=args.duration, rate=args.rate, registry=args.registry)
    return 2

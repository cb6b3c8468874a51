"""Discovery kinds by the name the config uses (`discovery = "..."`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.config import Config, UpstreamConfig
from proxy.discovery import CatalogSink, Watcher


def _consul(config: Config, upstream: UpstreamConfig, sink: CatalogSink, **kw: Any) -> Watcher:
    from proxy.discovery.consul import ConsulWatcher

    return ConsulWatcher(config.consul, upstream, sink, **kw)


def _dns(config: Config, upstream: UpstreamConfig, sink: CatalogSink, **kw: Any) -> Watcher:
    from proxy.discovery.dns import DnsWatcher

    return DnsWatcher(config.dns, upstream, sink)


def _file(config: Config, upstream: UpstreamConfig, sink: CatalogSink, **kw: Any) -> Watcher:
    from proxy.discovery.file import FileWatcher

    return FileWatcher(upstream, sink)


def _static(config: Config, upstream: UpstreamConfig, sink: CatalogSink, **kw: Any) -> Watcher:
    from proxy.discovery.static import StaticWatcher

    return StaticWatcher(upstream, sink)


def _etcd(config: Config, upstream: UpstreamConfig, sink: CatalogSink, **kw: Any) -> Watcher:
    from proxy.discovery.etcd import EtcdWatcher

    return EtcdWatcher(config.etcd, upstream, sink)


def _zookeeper(config: Config, upstream: UpstreamConfig, sink: CatalogSink,
               **kw: Any) -> Watcher:
    from proxy.discovery.zookeeper import ZooKeeperWatcher

    return ZooKeeperWatcher(config.zookeeper, upstream, sink)


WATCHERS: dict[str, Callable[..., Watcher]] = {
    "consul": _consul,
    "dns": _dns,
    "file": _file,
    "static": _static,
    "etcd": _etcd,
    "zookeeper": _zookeeper,
}


class UnsupportedDiscovery(Exception):
    pass


def make_watcher(config: Config, upstream: UpstreamConfig, sink: CatalogSink,
                 **kw: Any) -> Watcher:
    try:
        factory = WATCHERS[upstream.discovery]
    except KeyError:
        raise UnsupportedDiscovery(
            f"upstream {upstream.name}: discovery {upstream.discovery!r} is not available in "
            f"this version (available: {', '.join(WATCHERS)})") from None
    return factory(config, upstream, sink, **kw)

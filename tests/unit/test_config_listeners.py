"""[[listeners]] in proxy.config: routes, catalog_routes, upstreams without `listen`."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, ListenerConfig, RouteConfig, load
from proxy.model import Address

UPSTREAMS = """
[defaults]
header_timeout = "3s"
retries = 1
[defaults.breaker]
failures = 7
[[upstreams]]
name = "api"
[[upstreams]]
name = "assets"
listen = "127.0.0.1:8082"
"""
LISTENER = """
[[listeners]]
listen = "127.0.0.1:8080"
routes = [
  { host = "api.example", path_prefix = "/v1/", upstream = "api", strip_prefix = true },
  { path_prefix = "/static/", upstream = "assets" },
]
"""


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    return load(str(path), {})


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return [p.split(": ", 1)[1] for p in info.value.problems]


def test_a_listener_with_routes_and_an_upstream_without_listen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, UPSTREAMS + LISTENER)
    api, assets = cfg.upstreams
    assert api.listen is None and assets.listen == Address("127.0.0.1", 8082)
    (listener,) = cfg.listeners
    assert isinstance(listener, ListenerConfig)
    assert listener.listen == Address("127.0.0.1", 8080)
    assert listener.mode == "http" and not listener.catalog_routes
    assert listener.tag_prefix == "urlprefix-"
    assert listener.routes == (
        RouteConfig(upstream="api", host="api.example", path_prefix="/v1/", strip_prefix=True),
        RouteConfig(upstream="assets", host="", path_prefix="/static/", strip_prefix=False))
    # The listener's own limits, and the template of catalog upstreams: [defaults].
    assert listener.defaults.header_timeout == 3.0
    assert listener.defaults.retries == 1
    assert listener.defaults.breaker.failures == 7
    assert listener.defaults.listen == listener.listen


def test_the_old_one_upstream_per_listener_form_is_unchanged(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\n')
    assert cfg.listeners == () and cfg.upstreams[0].listen == Address("127.0.0.1", 8081)


def test_catalog_routes_alone_need_no_route(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[[listeners]]\nlisten = "127.0.0.1:8080"\n'
                              'catalog_routes = true\ntag_prefix = "route-"\n')
    assert cfg.listeners[0].catalog_routes and cfg.listeners[0].tag_prefix == "route-"
    assert cfg.listeners[0].routes == ()


@pytest.mark.parametrize(("text", "expected"), [
    # an upstream no route reaches needs a listen of its own
    ('[[upstreams]]\nname = "lonely"\n',
     ["upstreams[0].listen: required, unless a route of [[listeners]] names this upstream"]),
    # routes to unknown upstreams, or to a tcp one
    (UPSTREAMS + '[[upstreams]]\nname = "raw"\nmode = "tcp"\nlisten = "127.0.0.1:8090"\n'
     '[[listeners]]\nlisten = "127.0.0.1:8080"\nroutes = [\n'
     '  { path_prefix = "/a/", upstream = "api" },\n'
     '  { path_prefix = "/b/", upstream = "nope" },\n'
     '  { path_prefix = "/c/", upstream = "raw" },\n]\n',
     ['listeners[0].routes[1].upstream: no upstream named "nope"',
      'listeners[0].routes[2].upstream: upstream "raw" has mode = "tcp"; routes need "http"']),
    # identical host and prefix (host compared as the table does: case, final dot)
    (UPSTREAMS + '[[listeners]]\nlisten = "127.0.0.1:8080"\nroutes = [\n'
     '  { host = "API.example", path_prefix = "/v1/", upstream = "api" },\n'
     '  { path_prefix = "/v1/", upstream = "api" },\n'
     '  { host = "api.example.", path_prefix = "/v1/", upstream = "assets" },\n]\n',
     [('listeners[0].routes[2]: same host and path_prefix as listeners[0].routes[0] '
       '("api.example./v1/")')]),
    # bad keys and values, each under its own index
    (UPSTREAMS + '[[listeners]]\nlisten = "127.0.0.1:8080"\nmode = "tcp"\nroutes = [\n'
     '  { host = "a b", path_prefix = "v1/", upstream = "api", strip = true },\n'
     '  { path_prefix = "/x/" },\n]\n',
     ['listeners[0].mode: must be one of http; got "tcp"',
      'listeners[0].routes[0].host: expected a host name or "*.domain" (no port), got "a b"',
      'listeners[0].routes[0].path_prefix: must start with "/", got "v1/"',
      "listeners[0].routes[0].strip: unknown key",
      "listeners[0].routes[1].upstream: required"]),
    # a listener needs routes or catalog_routes, and an address of its own
    ('[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\n'
     + '[[listeners]]\nlisten = "127.0.0.1:8081"\n',
     ["listeners[0].routes: required (at least one) unless catalog_routes = true",
      'listeners[0].listen: "127.0.0.1:8081" is already used by upstreams[0].listen']),
    ('[[listeners]]\ncatalog_routes = true\n', ["listeners[0].listen: required"]),
])
def test_problems_name_their_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected


def test_wildcard_hosts_are_accepted(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, UPSTREAMS + '[[listeners]]\nlisten = "127.0.0.1:8080"\n'
                    'routes = [{ host = "*.example.com", upstream = "api" }]\n')
    assert cfg.listeners[0].routes[0].host == "*.example.com"
    assert cfg.listeners[0].routes[0].path_prefix == "/"

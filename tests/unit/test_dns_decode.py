"""dns_decode: DNS responses -> endpoints and the next lookup's delay, without sockets.

Responses are built with dnspython's own helpers (`make_query` + `make_response`, and
`from_text` for a whole message copied from a real Consul 1.8 answer), so the tests feed
decode exactly the objects the resolver hands the watcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from support.dnsmsg import reply as reply_to

from proxy.discovery.dns_decode import (
    MIN_DELAY,
    Addresses,
    Decoded,
    DnsDecodeError,
    decode_a,
    decode_addresses,
    decode_srv,
    merge,
    next_delay,
    positive_min,
    query_name,
    srv_endpoints,
)
from proxy.model import Endpoint

# What Consul 1.8's DNS interface answers for a service with two instances: one
# registered with Service.Address (target <hex ip>.addr.<dc>.consul.), one without (target
# <node>.node.<dc>.consul., the node's address), both with their A record in the
# additional section and TTL 0; node meta arrives as TXT and must be ignored.
CONSUL_SRV = """\
id 52990
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
web.service.consul. IN SRV
;ANSWER
web.service.consul. 0 IN SRV 1 1 9006 sdproxy-dev.node.dc1.consul.
web.service.consul. 0 IN SRV 1 1 9007 7f000009.addr.dc1.consul.
;AUTHORITY
;ADDITIONAL
sdproxy-dev.node.dc1.consul. 0 IN A 127.0.0.1
sdproxy-dev.node.dc1.consul. 0 IN TXT "consul-network-segment="
7f000009.addr.dc1.consul. 0 IN A 127.0.0.9
"""

# Consul when no instance passes: NXDOMAIN with its SOA (negative TTL 0).
CONSUL_NXDOMAIN = """\
id 9713
opcode QUERY
rcode NXDOMAIN
flags QR AA RD
;QUESTION
crit.service.consul. IN SRV
;ANSWER
;AUTHORITY
consul. 0 IN SOA ns.consul. hostmaster.consul. 1795322011 3600 600 86400 0
;ADDITIONAL
"""

QNAME = "web.service.consul."


def reply(qname: str, rdtype: str, answer: Sequence[str] = (), *,
          additional: Sequence[str] = (), authority: Sequence[str] = (),
          rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> dns.message.Message:
    """A response to `qname rdtype` with the given records ("name ttl IN type rdata")."""
    return reply_to(dns.message.make_query(qname, rdtype), answer, additional=additional,
                    authority=authority, rcode=rcode)


def srv(*records: str, additional: Sequence[str] = (), ttl: int = 0) -> dns.message.Message:
    """SRV answer for QNAME; each record "priority weight port target"."""
    return reply(QNAME, "SRV", [f"{QNAME} {ttl} IN SRV {r}" for r in records],
                 additional=additional)


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def ids(decoded: Decoded) -> list[str]:
    return [e.id for e in decoded.endpoints]


# -- query names ------------------------------------------------------------------------
@pytest.mark.parametrize("service,domain,expected", [
    ("web", "service.consul", "web.service.consul."),
    ("web", ".service.consul.", "web.service.consul."),
    ("tasks.web", "", "tasks.web."),          # Docker Swarm: the name as given
    ("tasks.web.", "", "tasks.web."),
    ("api", "service.dc2.consul", "api.service.dc2.consul."),
])
def test_query_name(service: str, domain: str, expected: str) -> None:
    assert query_name(service, domain) == name(expected)
    assert query_name(service, domain).is_absolute()


def test_query_name_too_long_label_is_a_decode_error() -> None:
    with pytest.raises(DnsDecodeError, match="invalid query name"):
        query_name("x" * 64, "service.consul")


# -- SRV --------------------------------------------------------------------------------
def test_consul_srv_answer_uses_the_additional_section() -> None:
    answer = decode_srv(dns.message.from_text(CONSUL_SRV))
    assert answer.pending == ()
    decoded = srv_endpoints(answer)
    assert decoded == Decoded((
        Endpoint(id="127.0.0.1:9006", address="127.0.0.1", port=9006,
                 node="sdproxy-dev.node.dc1.consul", weight=1),
        Endpoint(id="127.0.0.9:9007", address="127.0.0.9", port=9007,
                 node="7f000009.addr.dc1.consul", weight=1),
    ), None)  # TTL 0 everywhere: no deadline of its own


def test_target_without_address_is_pending_until_resolved() -> None:
    answer = decode_srv(srv("1 1 9001 web-1.example.", "1 1 9002 web-2.example.",
                            additional=["web-2.example. 0 IN A 10.0.0.2"]))
    assert answer.pending == (name("web-1.example."),)
    # Not resolved (the lookup found nothing): left out, the rest still routes.
    assert ids(srv_endpoints(answer)) == ["10.0.0.2:9002"]
    resolved = {name("web-1.example."): Addresses(("10.0.0.1",), None)}
    decoded = srv_endpoints(answer, resolved)
    assert ids(decoded) == ["10.0.0.1:9001", "10.0.0.2:9002"]
    assert decoded.endpoints[0].node == "web-1.example"


def test_pending_lists_each_target_once() -> None:
    answer = decode_srv(srv("1 1 9001 host.example.", "1 1 9002 host.example.",
                            "1 1 9003 other.example."))
    assert answer.pending == (name("host.example."), name("other.example."))


def test_target_with_a_and_aaaa_gives_one_endpoint_per_address() -> None:
    decoded = srv_endpoints(decode_srv(srv(
        "1 1 9001 dual.example.",
        additional=["dual.example. 0 IN A 10.0.0.1", "dual.example. 0 IN AAAA 2001:db8::1"])))
    assert ids(decoded) == ["10.0.0.1:9001", "[2001:db8::1]:9001"]
    assert decoded.endpoints[1].address == "2001:db8::1"


def test_target_address_behind_a_cname_in_the_additional_section() -> None:
    decoded = srv_endpoints(decode_srv(srv(
        "1 1 9001 alias.example.",
        additional=["alias.example. 30 IN CNAME real.example.",
                    "real.example. 60 IN A 10.0.0.7"])))
    assert decoded == Decoded((Endpoint(id="10.0.0.7:9001", address="10.0.0.7", port=9001,
                                        node="alias.example"),), 30)


def test_target_names_compare_case_insensitively() -> None:
    answer = decode_srv(srv("1 1 9001 Node1.Node.DC1.Consul.",
                            additional=["node1.node.dc1.consul. 0 IN A 10.0.0.1"]))
    assert answer.pending == ()
    assert ids(srv_endpoints(answer)) == ["10.0.0.1:9001"]


@pytest.mark.parametrize("weight,expected", [(0, 1), (1, 1), (5, 5), (65535, 65535)])
def test_weight_zero_means_rarely_not_never(weight: int, expected: int) -> None:
    decoded = srv_endpoints(decode_srv(srv(f"1 {weight} 9001 a.example.",
                                           additional=["a.example. 0 IN A 10.0.0.1"])))
    assert decoded.endpoints[0].weight == expected


def test_same_socket_address_twice_is_one_endpoint_with_the_higher_weight() -> None:
    decoded = srv_endpoints(decode_srv(srv(
        "1 2 9001 a.example.", "1 7 9001 b.example.",
        additional=["a.example. 0 IN A 10.0.0.1", "b.example. 0 IN A 10.0.0.1"])))
    assert [(e.id, e.weight) for e in decoded.endpoints] == [("10.0.0.1:9001", 7)]


def test_root_target_and_port_zero_are_skipped() -> None:
    answer = decode_srv(srv("1 1 9001 .", "1 1 0 a.example.", "1 1 9003 b.example.",
                            additional=["a.example. 0 IN A 10.0.0.1",
                                        "b.example. 0 IN A 10.0.0.2"]))
    assert answer.pending == ()  # "." is not looked up
    assert ids(srv_endpoints(answer)) == ["10.0.0.2:9003"]


def test_lowest_priority_wins_and_backups_take_over_when_it_has_no_address() -> None:
    answer = decode_srv(srv("10 1 9001 primary.example.", "20 1 9002 backup.example.",
                            additional=["backup.example. 0 IN A 10.0.0.2"]))
    # The primary's address is still to be looked up.
    assert answer.pending == (name("primary.example."),)
    with_primary = srv_endpoints(answer, {name("primary.example."): Addresses(("10.0.0.1",))})
    assert ids(with_primary) == ["10.0.0.1:9001"]
    # RFC 2782: the lowest priority *that can be reached*; an unresolvable primary is not.
    assert ids(srv_endpoints(answer, {name("primary.example."): Addresses(())})) == [
        "10.0.0.2:9002"]


def test_order_of_records_does_not_matter() -> None:
    extra = ["a.example. 0 IN A 10.0.0.1", "b.example. 0 IN A 10.0.0.2"]
    one = srv_endpoints(decode_srv(srv("1 1 9001 a.example.", "1 1 9002 b.example.",
                                       additional=extra)))
    two = srv_endpoints(decode_srv(srv("1 1 9002 b.example.", "1 1 9001 a.example.",
                                       additional=list(reversed(extra)))))
    assert one == two
    assert ids(one) == sorted(ids(one))


def test_consul_nxdomain_is_an_empty_answer_without_a_deadline() -> None:
    answer = decode_srv(dns.message.from_text(CONSUL_NXDOMAIN))
    assert srv_endpoints(answer) == Decoded((), None)


def test_nodata_is_an_empty_answer() -> None:
    # Without an SOA, dnspython's default negative TTL (300 s) stands in (RFC 2308).
    assert srv_endpoints(decode_srv(srv())) == Decoded((), 300)


def test_srv_behind_a_cname() -> None:
    response = reply(QNAME, "SRV", [f"{QNAME} 40 IN CNAME real.example.",
                                    "real.example. 50 IN SRV 1 1 9001 a.example."],
                     additional=["a.example. 0 IN A 10.0.0.1"])
    assert srv_endpoints(decode_srv(response)) == Decoded(
        (Endpoint(id="10.0.0.1:9001", address="10.0.0.1", port=9001, node="a.example"),), 40)


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED,
                                   dns.rcode.FORMERR])
def test_failure_rcodes_are_errors_not_empty_answers(rcode: dns.rcode.Rcode) -> None:
    with pytest.raises(DnsDecodeError, match=dns.rcode.to_text(rcode)):
        decode_srv(reply(QNAME, "SRV", rcode=rcode))


def test_nxdomain_with_records_is_malformed() -> None:
    response = srv("1 1 9001 a.example.")
    response.set_rcode(dns.rcode.NXDOMAIN)
    with pytest.raises(DnsDecodeError, match="malformed"):
        decode_srv(response)


def test_cname_loop_is_malformed() -> None:
    looping = reply(QNAME, "SRV", [f"{QNAME} 0 IN CNAME x.example.",
                                   f"x.example. 0 IN CNAME {QNAME}"])
    with pytest.raises(DnsDecodeError, match="malformed"):
        decode_srv(looping)


def test_a_response_is_not_an_srv_answer_and_back() -> None:
    with pytest.raises(DnsDecodeError, match="expected SRV records, got A"):
        decode_srv(reply(QNAME, "A", [f"{QNAME} 0 IN A 10.0.0.1"]))
    with pytest.raises(DnsDecodeError, match="expected A records, got SRV"):
        decode_a(srv("1 1 9001 a.example."), 80)


# -- SRV target lookups -----------------------------------------------------------------
def test_decode_addresses() -> None:
    assert decode_addresses(reply("a.example.", "A", ["a.example. 20 IN A 10.0.0.1",
                                                      "a.example. 20 IN A 10.0.0.2"])) == \
        Addresses(("10.0.0.1", "10.0.0.2"), 20)
    assert decode_addresses(reply("a.example.", "AAAA", ["a.example. 0 IN AAAA ::1"])) == \
        Addresses(("::1",), None)
    assert decode_addresses(reply("a.example.", "A", rcode=dns.rcode.NXDOMAIN)) == \
        Addresses((), 300)  # no SOA: dnspython's default negative TTL
    assert decode_addresses(reply("a.example.", "A")).addresses == ()


# -- A mode -----------------------------------------------------------------------------
def test_a_records_at_the_fixed_port() -> None:
    response = reply("tasks.web.", "A", ["tasks.web. 600 IN A 10.0.1.7",
                                         "tasks.web. 600 IN A 10.0.1.3",
                                         "tasks.web. 600 IN A 10.0.1.3"])
    assert decode_a(response, 8080) == Decoded((
        Endpoint(id="10.0.1.3:8080", address="10.0.1.3", port=8080),
        Endpoint(id="10.0.1.7:8080", address="10.0.1.7", port=8080),
    ), 600)


def test_a_mode_empty_and_nxdomain() -> None:
    assert decode_a(reply("tasks.web.", "A"), 80) == Decoded((), 300)
    assert decode_a(reply("tasks.web.", "A", rcode=dns.rcode.NXDOMAIN,
                          authority=["web. 60 IN SOA ns. host. 1 2 3 4 5"]), 80) == \
        Decoded((), 5)  # RFC 2308: negative TTL = min(SOA TTL, SOA minimum)


def test_a_mode_follows_cnames() -> None:
    response = reply("web.example.", "A", ["web.example. 0 IN CNAME lb.example.",
                                           "lb.example. 0 IN A 10.0.0.1"])
    assert ids(decode_a(response, 443)) == ["10.0.0.1:443"]


# -- TTLs and the next lookup -----------------------------------------------------------
@pytest.mark.parametrize("ttl,interval,expected", [
    (None, 1.0, 1.0),      # no TTL: the interval
    (0, 1.0, 1.0),         # Consul's TTL 0 means "do not cache", not "ask again now"
    (5, 1.0, 1.0),         # a longer TTL never delays the interval
    (2, 30.0, 2.0),        # a shorter one brings the next lookup forward
    (None, 0.0, MIN_DELAY),  # never spin
])
def test_next_delay(ttl: int | None, interval: float, expected: float) -> None:
    assert next_delay(ttl, interval) == expected


def test_ttl_is_the_smallest_positive_of_the_records_used() -> None:
    response = srv("1 1 9001 a.example.", "1 1 9002 b.example.", ttl=0,
                   additional=["a.example. 45 IN A 10.0.0.1", "b.example. 0 IN A 10.0.0.2"])
    decoded = srv_endpoints(decode_srv(response))
    assert decoded.ttl == 45
    assert next_delay(decoded.ttl, 60.0) == 45.0
    # A resolved target's TTL counts too.
    answer = decode_srv(srv("1 1 9001 c.example.", ttl=90))
    decoded = srv_endpoints(answer, {name("c.example."): Addresses(("10.0.0.3",), 12)})
    assert decoded.ttl == 12


def test_backup_targets_do_not_shorten_the_ttl() -> None:
    decoded = srv_endpoints(decode_srv(srv(
        "1 1 9001 a.example.", "2 1 9002 b.example.",
        additional=["a.example. 100 IN A 10.0.0.1", "b.example. 3 IN A 10.0.0.2"])))
    assert (ids(decoded), decoded.ttl) == (["10.0.0.1:9001"], 100)


def test_positive_min_and_merge() -> None:
    assert positive_min([None, 0, 7, 3]) == 3
    assert positive_min([0, None]) is None
    a = Endpoint(id="b:1", address="b", port=1)
    b = Endpoint(id="a:1", address="a", port=1, weight=3)
    assert merge([a, b, Endpoint(id="a:1", address="a", port=1)]) == (b, a)

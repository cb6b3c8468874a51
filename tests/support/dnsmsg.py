"""DNS responses written as text, for the tests of DNS discovery (dnspython objects only).

`reply(query, answer, additional=..., authority=..., rcode=...)` answers `query` with
records given as "name ttl IN type rdata" lines. Records go in with
`find_rrset(create=True)`, as `from_wire` puts them: one RRset per name and type, known
to the message's index (which lookups use), so a test hands the code the same objects a
resolver would.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.message
import dns.rcode
import dns.rrset


def reply(query: dns.message.Message, answer: Sequence[str] = (), *,
          additional: Sequence[str] = (), authority: Sequence[str] = (),
          rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> dns.message.Message:
    """A response to `query` with records written as "name ttl IN type rdata"."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for section, lines in ((response.answer, answer), (response.additional, additional),
                           (response.authority, authority)):
        for line in lines:
            owner, ttl, rdclass, rtype, rdata = line.split(None, 4)
            rrset = dns.rrset.from_text(owner, int(ttl), rdclass, rtype, rdata)
            into = response.find_rrset(section, rrset.name, rrset.rdclass, rrset.rdtype,
                                       create=True)
            for rd in rrset:
                into.add(rd, rrset.ttl)
    return response

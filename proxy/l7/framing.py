"""Message framing and connection persistence decisions (RFC 9112 sections 6 and 9).

Pure functions over header values, shared by both parsers so httptools and h11 frame
messages the same way. A request carrying both Content-Length and Transfer-Encoding, or
an invalid Content-Length, is rejected (RFC 9112 section 6.3: a proxy must not forward it).
"""

from __future__ import annotations

from proxy.l7.message import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, ParseError


def parse_content_length(values: list[bytes]) -> int:
    """One valid length from one or more Content-Length values (RFC 9110 section 8.6)."""
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:  # the common case, decided at once
            return int(value)
    lengths = {v.strip() for value in values for v in value.split(b",")}
    if len(lengths) != 1:
        raise ParseError("conflicting Content-Length values")
    (text,) = lengths
    if not text.isdigit() or len(text) > 18:
        raise ParseError(f"invalid Content-Length {text[:32]!r}")
    return int(text)


def _codings(transfer_encodings: list[bytes]) -> list[bytes]:
    return [c.strip().lower() for value in transfer_encodings for c in value.split(b",")]


def request_framing(content_lengths: list[bytes],
                    transfer_encodings: list[bytes]) -> tuple[int, int | None]:
    """(framing, content_length) of a request; ParseError for ambiguous framing."""
    if transfer_encodings:
        if content_lengths:
            raise ParseError("both Content-Length and Transfer-Encoding")
        if _codings(transfer_encodings) != [b"chunked"]:
            # Other codings would be lost when we re-chunk the body: refuse, as h11 does.
            raise ParseError("Transfer-Encoding other than chunked")
        return CHUNKED, None
    if content_lengths:
        length = parse_content_length(content_lengths)
        return (LENGTH, length) if length else (NO_BODY, 0)
    return NO_BODY, None


def response_framing(status: int, request_method: bytes, content_lengths: list[bytes],
                     transfer_encodings: list[bytes]) -> tuple[int, int | None]:
    """(framing, content_length) of a response to `request_method` (RFC 9112 6.3)."""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY, None
    if transfer_encodings:
        # Any coding but a final chunked would reach the client undone, or be dropped with
        # the hop-by-hop field when we re-chunk: neither is the response the instance sent.
        if _codings(transfer_encodings) != [b"chunked"]:
            raise ParseError("Transfer-Encoding other than chunked")
        return CHUNKED, None
    if content_lengths and not transfer_encodings:
        length = parse_content_length(content_lengths)
        return (LENGTH, length) if length else (NO_BODY, 0)
    return UNTIL_CLOSE, None


def wants_keep_alive(version: bytes, connection_tokens: frozenset[bytes]) -> bool:
    """Persistence per RFC 9112 section 9.3: 1.1 unless `close`, 1.0 only with keep-alive."""
    if b"close" in connection_tokens:
        return False
    if version == b"1.1":
        return True
    return b"keep-alive" in connection_tokens


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for value in values for t in value.split(b",") if t.strip())

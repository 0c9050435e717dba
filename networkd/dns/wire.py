"""DNS wire format, the few pieces the server needs, without dnslib.

dnslib parses and packs a message in ~100 us; the server answers most
queries in a few us from pre-packed bytes, so the hot path and the handling
of upstream answers only walk the bytes they need.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from networkd.dns.wirenames import (  # noqa: F401 - names on the wire, re-exported
    fold_question, name_ends_at_first_zero, name_to_wire, wire_to_text,
)

# Header flag bits (16-bit flags word).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}

TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_OPT, TYPE_ANY = 1, 2, 6, 28, 41, 255
CLASS_IN, CLASS_CH = 1, 3

OUR_UDP_SIZE = 1232  # the EDNS buffer size we announce (DNS flag day 2020)
PLAIN_UDP_SIZE = 512

_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength


class WireError(ValueError):
    """The bytes are not a well-formed DNS message."""


def skip_name(msg: bytes, offset: int) -> int:
    """Offset just after the (possibly compressed) name at ``offset``."""
    end = len(msg)
    hops = 0
    while True:
        if offset >= end:
            raise WireError("name runs past the end")
        length = msg[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise WireError("truncated pointer")
            return offset + 2
        if length & 0xC0:
            raise WireError("bad label type")
        offset += 1 + length
        hops += 1
        if hops > 127:
            raise WireError("too many labels")


def question_key(data: bytes):
    """The hot-path key of a query: flags + raw question + EDNS summary.

    None for anything unusual (those take the slow path).  The raw question
    keeps the client's case, so an answer packed for it echoes that case.
    The key ignores EDNS options (dig sends a random cookie with every query).
    """
    if len(data) < 17 or data[4:10] != b"\x00\x01\x00\x00\x00\x00" or data[2] & 0xFE:
        return None
    end = data.find(b"\x00", 12)
    if end < 0:
        return None
    qend = end + 5
    ar = data[10:12]
    if ar == b"\x00\x00":
        if len(data) != qend:
            return None
        return data[2:qend]
    if ar == b"\x00\x01" and data[qend:qend + 3] == b"\x00\x00\x29" and len(data) >= qend + 11:
        return data[2:qend] + b"E" + data[qend + 5:qend + 8]
    return None


def has_fixed_bytes(data: bytes) -> bool:
    """The query carries no EDNS options (no cookie), so its bytes after the
    ID repeat exactly and can key the hot path as they are."""
    qend = data.find(b"\x00", 12) + 5
    return len(data) == qend or (data[10:12] == b"\x00\x01" and len(data) == qend + 11)


@dataclass
class Query:
    """A parsed query: what the resolver needs, nothing more."""

    id: bytes
    flags: int
    question: bytes  # qname wire + qtype + qclass, as the client sent them
    qname: bytes  # wire form, client's case
    qtype: int
    qclass: int
    edns: bool = False
    udp_size: int = PLAIN_UDP_SIZE
    do: bool = False
    edns_version: int = 0

    @property
    def max_udp(self) -> int:
        return max(PLAIN_UDP_SIZE, min(self.udp_size, 65535)) if self.edns else PLAIN_UDP_SIZE


class QueryError(Exception):
    """The query cannot be answered normally: answer ``rcode`` (None: drop it)."""

    def __init__(self, reason: str, rcode: int | None, header: bytes = b"", question: bytes = b""):
        super().__init__(reason)
        self.rcode = rcode
        self.header = header
        self.question = question


def parse_query(data: bytes) -> Query:
    """Parse a query strictly; raise QueryError saying how to answer."""
    if len(data) < 12:
        raise QueryError("shorter than a header", None)
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    header = data[:12]
    if flags & QR:
        raise QueryError("a response, not a query", None)
    if (flags >> 11) & 0xF != 0:
        raise QueryError("opcode not supported", NOTIMP, header)
    if qdcount != 1:
        raise QueryError(f"{qdcount} questions", FORMERR, header)
    try:
        qend = _plain_name_end(data, 12)
        if qend + 4 > len(data):
            raise WireError("truncated question")
        qtype, qclass = struct.unpack_from(">HH", data, qend)
        question = data[12:qend + 4]
        query = Query(data[:2], flags, question, data[12:qend], qtype, qclass)
        offset = qend + 4
        for _ in range(ancount + nscount):
            offset = _skip_rr(data, offset)
        seen_opt = False
        for _ in range(arcount):
            start = offset
            offset = skip_name(data, offset)
            if offset + 10 > len(data):
                raise WireError("truncated record")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, offset)
            offset += 10 + rdlen
            if offset > len(data):
                raise WireError("truncated rdata")
            if rtype == TYPE_OPT:
                if seen_opt or data[start] != 0:
                    raise WireError("more than one OPT or OPT not at the root")
                seen_opt = True
                query.edns = True
                query.udp_size = rclass
                query.edns_version = (ttl >> 16) & 0xFF
                query.do = bool(ttl & 0x8000)
    except WireError as e:
        raise QueryError(str(e), FORMERR, header) from None
    return query


def _plain_name_end(msg: bytes, offset: int) -> int:
    """Like skip_name, but a question name may not be compressed."""
    start = offset
    while True:
        if offset >= len(msg):
            raise WireError("name runs past the end")
        length = msg[offset]
        if length == 0:
            if offset + 1 - start > 255:
                raise WireError("name longer than 255 bytes")
            return offset + 1
        if length & 0xC0:
            raise WireError("compressed or bad label in the question")
        offset += 1 + length


def _skip_rr(msg: bytes, offset: int) -> int:
    offset = skip_name(msg, offset)
    if offset + 10 > len(msg):
        raise WireError("truncated record")
    rdlen = struct.unpack_from(">H", msg, offset + 8)[0]
    offset += 10 + rdlen
    if offset > len(msg):
        raise WireError("truncated rdata")
    return offset


def opt_record(do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT record: root owner, our UDP size, version 0, the DO bit."""
    return b"\x00\x00\x29" + struct.pack(">HBBHH", OUR_UDP_SIZE, ext_rcode, 0, 0x8000 if do else 0, 0)


def response_flags(query_flags: int, rcode: int, aa: bool = False, ad: bool = False) -> int:
    """Response flags: QR, RA, RD and CD copied from the query."""
    flags = QR | RA | (query_flags & (RD | CD)) | (rcode & 0xF)
    if aa:
        flags |= AA
    if ad:
        flags |= AD
    return flags


def error_response(data_or_query, rcode: int, question: bytes = b"") -> bytes:
    """A header-only (or header + question) error answer."""
    if isinstance(data_or_query, Query):
        q = data_or_query
        body = q.question
        extra = opt_record(q.do, rcode >> 4) if q.edns else b""
        return q.id + struct.pack(">HHHHH", response_flags(q.flags, rcode), 1, 0, 0, 1 if extra else 0) + body + extra
    header = data_or_query[:12]
    flags = struct.unpack_from(">H", header, 2)[0]
    flags = QR | (flags & (0x7800 | RD | CD)) | (rcode & 0xF)
    return header[:2] + struct.pack(">HHHHH", flags, 1 if question else 0, 0, 0, 0) + question


def truncated(response: bytes, question_end: int, edns_do: bool | None) -> bytes:
    """The header and question of ``response`` with TC set (and an OPT if the client sent one)."""
    flags = struct.unpack_from(">H", response, 2)[0] | TC
    extra = opt_record(edns_do) if edns_do is not None else b""
    return response[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 1 if extra else 0) + response[12:question_end] + extra


@dataclass(slots=True)
class UpstreamAnswer:
    """What the cache needs from an upstream answer, found by one walk (one per cache entry: slots)."""

    rcode: int
    flags: int
    question_end: int  # the question, as the upstream echoed it, is body[12:question_end]
    body: bytes  # the message without its OPT record (ARCOUNT adjusted)
    # (offset in body, ttl, offset, ttl, ...) of every non-OPT record, flat (a pair each would weigh
    # ~60 bytes more, kept --dns-cache-size times); an SOA's is the negative TTL.  ``ttls()`` pairs them.
    ttl_offsets: tuple
    answer_count: int
    min_answer_ttl: int | None
    negative_ttl: int | None  # min(SOA ttl, SOA minimum) from the authority section

    @property
    def question(self) -> bytes:
        return self.body[12:self.question_end]

    def ttls(self):
        """(offset in body, ttl) of every non-OPT record."""
        flat = iter(self.ttl_offsets)
        return zip(flat, flat)


def inspect_answer(msg: bytes) -> UpstreamAnswer:
    """Walk an upstream answer; raise WireError if it is malformed."""
    if len(msg) < 12:
        raise WireError("shorter than a header")
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(msg)
    if qdcount != 1:
        raise WireError(f"{qdcount} questions in the answer")
    qend = skip_name(msg, 12) + 4
    if qend > len(msg):
        raise WireError("truncated question")
    offset = qend
    ttls = []
    min_answer = None
    negative = None
    opt_span = None
    ext_rcode = 0
    for index in range(ancount + nscount + arcount):
        start = offset
        offset = skip_name(msg, offset)
        if offset + 10 > len(msg):
            raise WireError("truncated record")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(msg, offset)
        ttl_at = offset + 4
        offset += 10 + rdlen
        if offset > len(msg):
            raise WireError("truncated rdata")
        if rtype == TYPE_OPT:
            if opt_span is not None:
                raise WireError("two OPT records")
            opt_span = (start, offset)
            ext_rcode = ttl >> 24
            continue
        if index < ancount:
            min_answer = ttl if min_answer is None else min(min_answer, ttl)
        elif index < ancount + nscount and rtype == TYPE_SOA and rdlen >= 22:
            # RFC 2308 s3, s5: the SOA carries the negative TTL, and counts down with it
            ttl = min(ttl, struct.unpack_from(">I", msg, offset - 4)[0])
            negative = ttl if negative is None else min(negative, ttl)
        ttls += (ttl_at, ttl)
    body = msg
    if opt_span is not None:
        start, end = opt_span
        if end != offset:
            raise WireError("OPT is not the last record")  # never happens in practice
        body = msg[:start] + msg[end:]
        body = body[:10] + struct.pack(">H", arcount - 1) + body[12:]
    elif offset != len(msg):
        body = msg[:offset]
    return UpstreamAnswer(
        rcode=(flags & 0xF) | (ext_rcode << 4),
        flags=flags,
        question_end=qend,
        body=body,
        ttl_offsets=tuple(ttls),
        answer_count=ancount,
        min_answer_ttl=min_answer,
        negative_ttl=negative,
    )


def make_query(qid: int, question: bytes, do: bool, cd: bool = False) -> bytes:
    """A query as we send it upstream: RD, one question, one OPT."""
    flags = RD | (CD if cd else 0)
    return struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1) + question + opt_record(do)

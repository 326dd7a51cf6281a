"""DNS refusal replies (DESIGN §8), pure: bytes in, bytes out.

Every query gets REFUSED with its ID, opcode, RD and question copied; nothing after the question
(the reference echoed trailing OPT bytes) and never an answer. Parsing is defensive: any
malformation degrades to the header-only reply, never an exception."""

from __future__ import annotations

import struct

from .record import record

HEADER_LEN = 12
RCODE_REFUSED = 5
MAX_LABEL = 63
MAX_NAME = 255


@record
class Question:
    qname: str  # dotted, lower-case as received; "." for the root
    qtype: int
    qclass: int
    raw: bytes  # wire bytes of the first question (name + type + class), copied verbatim


def _read_name(msg: bytes, pos: int) -> tuple[str, int] | None:
    """Read an uncompressed name at pos (queries never need compression; refuse pointers)."""
    labels: list[str] = []
    total = 0
    while True:
        if pos >= len(msg):
            return None
        n = msg[pos]
        pos += 1
        if n == 0:
            break
        if n > MAX_LABEL:  # 0xC0 pointers and reserved label types
            return None
        if pos + n > len(msg):
            return None
        total += n + 1
        if total > MAX_NAME:
            return None
        labels.append(msg[pos : pos + n].decode("latin-1"))
        pos += n
    return (".".join(labels) or "."), pos


def parse_question(msg: bytes) -> Question | None:
    """The first question of a query, or None when the message has none we can parse."""
    if len(msg) < HEADER_LEN:
        return None
    qdcount = struct.unpack_from("!H", msg, 4)[0]
    if qdcount < 1:
        return None
    got = _read_name(msg, HEADER_LEN)
    if got is None:
        return None
    name, pos = got
    if pos + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack_from("!HH", msg, pos)
    return Question(name, qtype, qclass, bytes(msg[HEADER_LEN : pos + 4]))


def refusal(msg: bytes) -> bytes | None:
    """The REFUSED reply for one query message, or None (no reply) when it is under 12 bytes.

    Only the first question is echoed (QDCOUNT 1); a multi-question query is refused as a whole."""
    if len(msg) < HEADER_LEN:
        return None
    ident, flags = struct.unpack_from("!HH", msg, 0)
    opcode = flags & 0x7800
    rd = flags & 0x0100
    out_flags = 0x8000 | opcode | rd | RCODE_REFUSED
    q = parse_question(msg)
    if q is None:
        return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)
    return struct.pack("!HHHHHH", ident, out_flags, 1, 0, 0, 0) + q.raw


def tcp_frames(buf: bytearray, max_frame: int) -> tuple[list[bytes], bool]:
    """Split complete 2-byte-length frames off the front of buf (in place).

    Returns (messages, oversize): oversize means a frame longer than max_frame was announced and
    the connection must be closed."""
    out: list[bytes] = []
    while len(buf) >= 2:
        n = (buf[0] << 8) | buf[1]
        if n > max_frame:
            return out, True
        if len(buf) < 2 + n:
            break
        out.append(bytes(buf[2 : 2 + n]))
        del buf[: 2 + n]
    return out, False


def frame(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1


def answer(msg: bytes, v4: bytes | None, v6: bytes | None, ttl: int) -> bytes | None:
    """The NOERROR reply for one query whose name the caller decided to answer (DESIGN §5.4): an
    A record with `v4` (4 bytes) for an A query, an AAAA record with `v6` (16 bytes) for AAAA,
    no record (NODATA) for any other type; the question echoed, the answer's name a pointer to
    it. None when the message has no question we can parse (the caller refuses it then)."""
    if len(msg) < HEADER_LEN:
        return None
    q = parse_question(msg)
    if q is None or q.qclass != QCLASS_IN:
        return None
    ident, flags = struct.unpack_from("!HH", msg, 0)
    if flags & 0x7800:  # only standard queries (opcode 0) are answered
        return None
    rd = flags & 0x0100
    out_flags = 0x8000 | 0x0400 | rd | 0x0080  # QR, AA, RD copied, RA
    rdata = v4 if q.qtype == QTYPE_A else v6 if q.qtype == QTYPE_AAAA else None
    answers = b""
    if rdata is not None:
        answers = struct.pack("!HHHIH", 0xC000 | HEADER_LEN, q.qtype, QCLASS_IN, ttl, len(rdata)) + rdata
    return struct.pack("!HHHHHH", ident, out_flags, 1, 1 if answers else 0, 0, 0) + q.raw + answers

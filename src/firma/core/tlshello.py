"""Peek at the first client bytes of a CONNECT tunnel: is it a TLS ClientHello, and which SNI
does it name? Pure; handles a ClientHello split over several handshake records."""

from __future__ import annotations

from .record import record


MAX_HELLO = 64 * 1024
EXT_SNI = 0
EXT_ECH = 0xFE0D


@record
class Hello:
    sni: str | None
    ech: bool


class NeedMore(Exception):
    pass


class NotTls(Exception):
    pass


class BadHello(Exception):
    pass


def parse_client_hello(buf: bytes) -> Hello:
    """Raises NeedMore (read more bytes), NotTls (first byte is not a handshake record) or
    BadHello (a handshake record that is not a well-formed ClientHello)."""
    if not buf:
        raise NeedMore()
    if buf[0] != 0x16:
        raise NotTls()
    # Reassemble the handshake message from consecutive handshake records.
    hs = bytearray()
    pos = 0
    need = None
    while True:
        if len(buf) < pos + 5:
            raise NeedMore()
        if buf[pos] != 0x16 or buf[pos + 1] != 0x03:
            raise BadHello("not a TLS handshake record")
        rlen = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if rlen == 0 or rlen > 16384 + 256:
            raise BadHello("bad TLS record length")
        if len(buf) < pos + 5 + rlen:
            raise NeedMore()
        hs += buf[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
        if need is None and len(hs) >= 4:
            if hs[0] != 1:
                raise BadHello("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > MAX_HELLO:
                raise BadHello("ClientHello too large")
        if need is not None and len(hs) >= need:
            break
        if pos > MAX_HELLO:
            raise BadHello("ClientHello too large")
    return _hello_body(bytes(hs[4:need]))


def _hello_body(b: bytes) -> Hello:
    try:
        p = 2 + 32  # legacy_version, random
        sid = b[p]
        p += 1 + sid
        cs = int.from_bytes(b[p : p + 2], "big")
        p += 2 + cs
        cm = b[p]
        p += 1 + cm
        if p == len(b):
            return Hello(None, False)
        ext_len = int.from_bytes(b[p : p + 2], "big")
        p += 2
        end = p + ext_len
        if end != len(b):
            raise BadHello("extension block length mismatch")
        sni = None
        ech = False
        seen = set()
        while p < end:
            et = int.from_bytes(b[p : p + 2], "big")
            el = int.from_bytes(b[p + 2 : p + 4], "big")
            p += 4
            if p + el > end:
                raise BadHello("extension overruns ClientHello")
            if et in seen:
                raise BadHello("duplicate extension")
            seen.add(et)
            data = b[p : p + el]
            p += el
            if et == EXT_ECH:
                ech = True
            elif et == EXT_SNI:
                sni = _sni(data)
        return Hello(sni, ech)
    except IndexError:
        raise BadHello("truncated ClientHello") from None


def _sni(data: bytes) -> str:
    total = int.from_bytes(data[0:2], "big")
    if total + 2 != len(data):
        raise BadHello("bad server_name list length")
    p = 2
    names = []
    while p < len(data):
        typ = data[p]
        ln = int.from_bytes(data[p + 1 : p + 3], "big")
        p += 3
        if p + ln > len(data):
            raise BadHello("bad server_name length")
        if typ == 0:
            names.append(data[p : p + ln])
        p += ln
    if len(names) != 1:
        raise BadHello("server_name must hold exactly one host_name")
    try:
        return names[0].decode("ascii")
    except UnicodeDecodeError:
        raise BadHello("non-ASCII server_name") from None

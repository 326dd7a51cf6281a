"""HTTP/1.1 message bodies between the agent and an upstream, for the sidecar's plain and
inspected paths: exact framing, size limits, and the credential scans (DESIGN §5.7).

A body that must be scanned for placeholders is scanned as payload, never as framing (a chunk's
size line could split a placeholder); such a chunked body is forwarded re-chunked, which is the
same message. Bytes that failed a check are never forwarded."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Mapping

from ..core import http1
from ..core.credentials import NeedleScanner
from ..core.http1 import HttpError
from . import netio

# A deny reason prefix: a placeholder on its way where it may not go (DESIGN §5.7).
EXFILTRATION = "credential_exfiltration"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# A body of at most this many bytes, with placeholders to look for, is read whole and scanned
# before anything of its request leaves: a refused one never reaches the upstream. A longer (or
# chunked) body is scanned as it streams; a placeholder then ends it before its last byte.
HOLD_MAX = 1 << 20


async def hold(src: netio.Stream, framing: http1.Framing, *, idle: float, needles: Mapping[str, bytes],
               expects_continue: bool = False) -> tuple[bytes | None, str]:
    """(body, "") when the body was held and is clean; (None, reason) when it is refused (a
    placeholder: `credential_exfiltration:NAME`; or the agent closed before its end); (None, "")
    when it is not held (no needles, not a Content-Length body, or too long): stream it. An agent
    waiting for `100 Continue` gets it from here (the upstream's own comes later and is ignored)."""
    if not needles or framing.kind != "length" or framing.length > HOLD_MAX:
        return None, ""
    if expects_continue and framing.length:
        src.w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    data = bytearray()
    while len(data) < framing.length:
        got = await asyncio.wait_for(src.read_some(framing.length - len(data)), idle)
        if not got:
            return None, "client_body_truncated"
        data += got
    for name, needle in needles.items():
        if needle in data:
            return None, f"{EXFILTRATION}:{name}"
    return bytes(data), ""


async def send_request_body(src: netio.Stream, dst: netio.Stream, framing: http1.Framing, *, max_body: int,
                            idle: float, needles: Mapping[str, bytes], held: bytes | None = None) -> str:
    """Forward the request body of `framing` from `src` to `dst` (or the `held` one, already read
    and scanned); "" when all of it went, else a reason: the agent closed early, the body is too
    large or badly framed, or a placeholder was found (`credential_exfiltration:NAME`, its last
    byte never forwarded). On a reason `dst` is closed: the upstream sees a truncated request and
    the response wait ends at once."""
    if held is not None:
        dst.w.write(held)
        await dst.w.drain()
        return ""
    why = await _send(src, dst, framing, max_body=max_body, idle=idle, needles=needles)
    if why:
        dst.close()
    return why


async def _send(src: netio.Stream, dst: netio.Stream, framing: http1.Framing, *, max_body: int,
                idle: float, needles: Mapping[str, bytes]) -> str:
    if framing.kind == "none":
        return ""
    scan = NeedleScanner(dict(needles)) if needles else None
    if framing.kind == "length":
        left = framing.length
        while left:
            data = await asyncio.wait_for(src.read_some(min(left, netio.READ_CHUNK)), idle)
            if not data:
                return "client_body_truncated"
            left -= len(data)
            if scan is not None:
                data, found = scan.feed(data)
                if found:
                    return f"{EXFILTRATION}:{found}"
            dst.w.write(data)
            await dst.w.drain()
        if scan is not None:
            dst.w.write(scan.flush())
            await dst.w.drain()
        return ""
    scanner = http1.ChunkedScanner(decode=scan is not None)
    # The framing too (chunk extensions, trailers): dropped when re-chunking, but a placeholder
    # there is still an attempt, refused as one.
    framing_scan = NeedleScanner(dict(needles)) if needles else None
    while not scanner.done:
        data = await asyncio.wait_for(src.read_some(), idle)
        if not data:
            return "client_body_truncated"
        try:
            n = scanner.feed(data)
        except HttpError as exc:
            return exc.reason
        if scanner.body_bytes > max_body:
            return "body_too_large"
        if n < len(data):
            src.buf[:0] = data[n:]  # the next pipelined request
        if scan is None:
            dst.w.write(data[:n])
        else:
            assert scanner.payload is not None and framing_scan is not None
            _, found = framing_scan.feed(bytes(data[:n]))
            if found:
                return f"{EXFILTRATION}:{found}"
            payload = bytes(scanner.payload)
            scanner.payload.clear()
            safe, found = scan.feed(payload)
            if found:
                return f"{EXFILTRATION}:{found}"
            if safe:
                dst.w.write(chunk(safe))
        await dst.w.drain()
    if scan is not None:
        tail = scan.flush()
        dst.w.write((chunk(tail) if tail else b"") + LAST_CHUNK)
        await dst.w.drain()
    return ""


async def response_body(up: netio.Stream, framing: http1.Framing, idle: float, *, decode: bool) -> AsyncIterator[bytes]:
    """The response body's bytes as they arrive: the framing's exact bytes (chunked framing as
    sent, or with `decode` its payload), or everything until the upstream closes."""
    if framing.kind == "length":
        left = framing.length
        while left:
            data = await asyncio.wait_for(up.read_some(min(left, netio.READ_CHUNK)), idle)
            if not data:
                raise ConnectionError("upstream closed mid-body")
            left -= len(data)
            yield data
    elif framing.kind == "chunked":
        scanner = http1.ChunkedScanner(decode=decode)
        while not scanner.done:
            data = await asyncio.wait_for(up.read_some(), idle)
            if not data:
                raise ConnectionError("upstream closed mid-body")
            n = scanner.feed(data)
            if n < len(data):
                up.buf[:0] = data[n:]
            if scanner.payload is not None:
                out = bytes(scanner.payload)
                scanner.payload.clear()
                if out:
                    yield out
            else:
                yield data[:n]
    elif framing.kind == "close":
        while True:
            data = await asyncio.wait_for(up.read_some(), idle)
            if not data:
                return
            yield data

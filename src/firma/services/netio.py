"""Small asyncio helpers shared by the bridge and the sidecar: endpoints, buffered streams, relays."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Any, cast

from ..core.endpoint import parse_endpoint
from .listen import short_unix_path
from ..core.http1 import HttpError, head_end, plausible_request_start

READ_CHUNK = 1024 * 1024
STREAM_LIMIT = 4 * 1024 * 1024


async def open_endpoint(endpoint: str, timeout: float = 10.0, tls: Any = None):
    """A connection to a sidecar endpoint; `tls` (an SSLContext) makes it mutual TLS."""
    kind, addr = parse_endpoint(endpoint)
    if isinstance(addr, str):  # unix
        with short_unix_path(addr) as short:  # a long path is reached through its directory's fd
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(short, limit=STREAM_LIMIT), timeout)
        return reader, writer
    if tls is not None:
        coro = asyncio.open_connection(addr[0], addr[1], limit=STREAM_LIMIT, ssl=tls, server_hostname=addr[0])
    else:
        coro = asyncio.open_connection(addr[0], addr[1], limit=STREAM_LIMIT)
    reader, writer = await asyncio.wait_for(coro, timeout)
    nodelay(writer)
    return reader, writer


def nodelay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY (small requests must not wait for Nagle) and a larger write buffer (bulk relays)."""
    try:
        writer.transport.set_write_buffer_limits(high=STREAM_LIMIT)
    except (AttributeError, RuntimeError):
        pass
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def close_servers(servers: list[asyncio.base_events.Server], tasks: set[asyncio.Task]) -> None:
    """Stop accepting, cancel the connections' tasks and give them up to 5 s to end."""
    for srv in servers:
        srv.close()
    for t in list(tasks):
        t.cancel()
    if tasks:
        await asyncio.wait(list(tasks), timeout=5)
    servers.clear()


class Stream:
    """A StreamReader/Writer pair with a push-back buffer for head parsing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.buf = bytearray()
        self.got_any = False

    async def read_head(self, max_head: int, *, request: bool = False) -> bytes | None:
        """One head (through the blank line), None on EOF before any byte; HttpError when too large
        (or, with request=True, as soon as the bytes cannot start an HTTP request).

        Raises asyncio.IncompleteReadError on EOF in the middle of a head."""
        while True:
            if request:
                while self.buf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines before a request
                    del self.buf[:2]
            if request and self.buf and not plausible_request_start(self.buf):
                raise HttpError("malformed_request", "not an HTTP/1.x request")
            end = head_end(self.buf, max_head)
            if end is not None:
                raw = bytes(self.buf[:end])
                del self.buf[:end]
                return raw
            chunk = await self.r.read(65536)
            if not chunk:
                if self.buf:
                    raise asyncio.IncompleteReadError(bytes(self.buf), None)
                return None
            self.got_any = True
            self.buf += chunk

    async def read_some(self, n: int = READ_CHUNK) -> bytes:
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return await self.r.read(n)

    def take_buffer(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def close(self) -> None:
        try:
            self.w.close()
        except Exception:  # noqa: BLE001 - best effort: a socket option the platform lacks changes nothing else
            pass

    async def linger_close(self, secs: float = 1.0, max_bytes: int = 1 << 20) -> None:
        """Half-close, then discard what the peer still sends for a moment before closing, so an
        error response is not destroyed by a TCP reset over unread request bytes."""
        if self.w.is_closing():
            return
        try:
            await self.w.drain()
            if self.w.can_write_eof():
                self.w.write_eof()
            left = max_bytes
            deadline = time.monotonic() + secs
            while left > 0:
                rest = deadline - time.monotonic()
                if rest <= 0:
                    break
                data = await asyncio.wait_for(self.r.read(65536), rest)
                if not data:
                    break
                left -= len(data)
        except (OSError, RuntimeError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self.close()


class Activity:
    def __init__(self) -> None:
        self.last = time.monotonic()
        self.up = 0
        self.down = 0


async def pump(src, dst: asyncio.StreamWriter, act: Activity | None, direction: str) -> None:
    """Copy src (a Stream or StreamReader) to dst until EOF, then half-close dst."""
    read = src.read_some if isinstance(src, Stream) else src.read
    try:
        while True:
            data = await read(READ_CHUNK)
            if not data:
                break
            dst.write(data)
            if act is not None:
                act.last = time.monotonic()
                if direction == "up":
                    act.up += len(data)
                else:
                    act.down += len(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        pass


# A tunnel reads into one buffer shared by its two directions (the loop runs one callback at a
# time, and each read is handed to the other side's transport before the next). It starts small,
# so the many idle or chatty tunnels cost little, and grows once a read fills it: 1 MiB reads
# keep up with blocking threads on a bulk download, 256 KiB ones do not (bench/relay_copy.py).
RELAY_BUFFER_START = 64 * 1024
RELAY_BUFFER_BULK = 1024 * 1024
_WRITE_KEEPS_VIEWS = sys.version_info >= (3, 12)


def copies_unsent(t: asyncio.BaseTransport) -> bool:
    """Whether `t.write` copies what it cannot send at once, so the caller may reuse its buffer:
    a plain socket transport before 3.12 (from 3.12 it keeps a view); a TLS transport may keep a
    view."""
    return not _WRITE_KEEPS_VIEWS and t.get_extra_info("sslcontext") is None


class _Side(asyncio.BufferedProtocol):
    """One direction of a tunnel: bytes arriving on `src` are read into the tunnel's buffer and
    written straight to `dst` (no stream buffering, no allocation per read); when src's own
    write buffer fills, reading from dst pauses."""

    def __init__(self, tunnel: "_Tunnel", src: asyncio.Transport, dst: asyncio.Transport, up: bool) -> None:
        self.t, self.src, self.dst, self.up = tunnel, src, dst, up
        self.eof = False
        self.dst_copies = copies_unsent(dst)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.t.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.forward(self.t.buf[:nbytes])
        self.t.after_read(nbytes, self.dst, self.dst_copies)

    def forward(self, data: bytes | memoryview) -> None:
        if self.dst.is_closing():
            return
        self.dst.write(data)
        act = self.t.act
        act.last = time.monotonic()
        if self.up:
            act.up += len(data)
        else:
            act.down += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.dst.is_closing() and self.dst.can_write_eof():
            self.dst.write_eof()  # half-close: the other direction keeps flowing
        self.t.check()
        return True

    def connection_lost(self, exc) -> None:
        self.t.finish()

    def pause_writing(self) -> None:
        if not self.dst.is_closing():
            self.dst.pause_reading()

    def resume_writing(self) -> None:
        if not self.dst.is_closing():
            self.dst.resume_reading()


class _Tunnel:
    def __init__(self, act: Activity) -> None:
        self.act = act
        self.done = asyncio.get_running_loop().create_future()
        self.sides: list[_Side] = []
        self.buf = memoryview(bytearray(RELAY_BUFFER_START))

    def after_read(self, nbytes: int, dst: asyncio.Transport, dst_copies: bool) -> None:
        size = len(self.buf)
        if nbytes == size and size < RELAY_BUFFER_BULK:
            self.buf = memoryview(bytearray(RELAY_BUFFER_BULK))
        elif not dst_copies and dst.get_write_buffer_size():
            # What the destination did not send at once may be kept as a view of this buffer:
            # the next read goes into a fresh one (a fresh 1 MiB per partial send cost 20 % of
            # bulk throughput where it was not needed).
            self.buf = memoryview(bytearray(size))

    def check(self) -> None:
        if all(s.eof for s in self.sides):
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def take_buffered(st: Stream) -> tuple[bytes, bool]:
    """Bytes already read into the stream's buffers, and whether it had seen EOF."""
    rb = getattr(st.r, "_buffer", None)
    data = bytes(st.buf) + (bytes(rb) if rb else b"")
    st.buf.clear()
    if rb:
        rb.clear()
    return data, st.r.at_eof() or bool(getattr(st.r, "_eof", False))


async def relay(a: Stream, b: Stream, idle: float, lifetime: float, act: Activity) -> str:
    """Relay both ways until both directions end, idle time or lifetime runs out.

    The transports are switched from stream protocols to direct relay protocols: one copy per
    chunk instead of three, and flow control by pausing the reading side."""
    ta, tb = cast(asyncio.Transport, a.w.transport), cast(asyncio.Transport, b.w.transport)  # stream sockets
    tun = _Tunnel(act)
    sa, sb = _Side(tun, ta, tb, True), _Side(tun, tb, ta, False)
    tun.sides = [sa, sb]
    left_a, eof_a = take_buffered(a)
    left_b, eof_b = take_buffered(b)
    ta.set_protocol(sa)
    tb.set_protocol(sb)
    for side, left, eof in ((sa, left_a, eof_a), (sb, left_b, eof_b)):
        if left:
            side.forward(left)
        if eof:
            side.eof_received()
    for t in (ta, tb):
        if not t.is_closing():
            t.resume_reading()  # the stream protocol may have paused it
    start = time.monotonic()
    why = "closed"
    try:
        while not tun.done.done():
            await asyncio.wait([tun.done], timeout=min(idle, 5.0) / 2)
            now = time.monotonic()
            if tun.done.done():
                break
            if now - act.last > idle:
                why = "idle_timeout"
                break
            if now - start > lifetime:
                why = "lifetime_exceeded"
                break
    finally:
        for t in (ta, tb):
            t.close()
    return why


class _CountedInto(asyncio.BufferedProtocol):
    """`forward_counted`'s protocol: reads at most the bytes still owed into one buffer (so
    nothing past the body is taken) and writes them to `dst` (`_FlowTie` pauses it while dst
    is backed up)."""

    def __init__(self, src: asyncio.BaseTransport, dst: asyncio.StreamWriter, left: int) -> None:
        self.src, self.dst, self.left = src, dst, left
        self.buf = memoryview(bytearray(min(left, RELAY_BUFFER_BULK)))
        self.dst_copies = copies_unsent(dst.transport)
        self.done = asyncio.get_running_loop().create_future()
        self.last = time.monotonic()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf[: max(1, min(self.left, len(self.buf)))]

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        self.last = time.monotonic()
        self.dst.write(self.buf[:nbytes])
        self.left -= nbytes
        pending = self.dst.transport.get_write_buffer_size()
        if pending and not self.dst_copies:
            self.buf = memoryview(bytearray(len(self.buf)))  # dst may hold a view of the old one
        if self.left <= 0:
            self.done.set_result(None)
            cast(asyncio.ReadTransport, self.src).pause_reading()  # until the stream protocol is back

    def eof_received(self) -> bool:
        self._lost()
        return False

    def connection_lost(self, exc) -> None:
        self._lost()

    def _lost(self) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed mid-body"))


class _FlowTie(asyncio.Protocol):
    """The destination's protocol while a counted body flows into it: everything reaches the
    destination's own (stream) protocol as before, and its flow control also pauses and resumes
    reading the body's source, from the transport's callbacks, as the tunnel relay does (a
    coroutine woken per pause cost a fifth of bulk throughput; a backlog of megabytes in the
    destination's buffer is shifted by memmove after every send)."""

    def __init__(self, own: Any, body: _CountedInto) -> None:
        self.own, self.body = own, body

    def data_received(self, data: bytes) -> None:
        self.own.data_received(data)

    def eof_received(self) -> bool | None:
        return self.own.eof_received()

    def connection_lost(self, exc) -> None:
        self.own.connection_lost(exc)
        if not self.body.done.done():
            self.body.done.set_exception(ConnectionError("the receiving side closed mid-body"))

    def pause_writing(self) -> None:
        self.own.pause_writing()
        if not self.body.done.done():
            cast(asyncio.ReadTransport, self.body.src).pause_reading()

    def resume_writing(self) -> None:
        self.own.resume_writing()
        if not self.body.done.done() and not self.body.src.is_closing():
            cast(asyncio.ReadTransport, self.body.src).resume_reading()


async def forward_counted(src: Stream, dst: asyncio.StreamWriter, n: int, idle: float) -> None:
    """Copy exactly n bytes from src to dst, reading straight into one buffer (a TLS transport
    decrypts many records per call into it), then give src back to its stream protocol for the
    next response on the connection. ConnectionError when src ends first."""
    data, eof = take_buffered(src)
    if data:
        if len(data) > n:
            src.buf[:0] = data[n:]  # what follows the body stays for the next read
        dst.write(data[:n])
        n -= min(n, len(data))
    if n == 0:
        await dst.drain()
        return
    if eof:
        raise ConnectionError("upstream closed mid-body")
    await dst.drain()  # from here the destination's pause_writing/resume_writing drive the source
    t = src.w.transport
    stream_protocol = t.get_protocol()
    c = _CountedInto(t, dst, n)
    t.set_protocol(c)
    dt = dst.transport
    dst_protocol = dt.get_protocol()
    dt.set_protocol(_FlowTie(dst_protocol, c))
    cast(asyncio.ReadTransport, t).resume_reading()
    try:
        while not c.done.done():
            await asyncio.wait([c.done], timeout=min(idle, 5.0))
            if not c.done.done() and time.monotonic() - c.last > idle:
                raise asyncio.TimeoutError()
        c.done.result()
    finally:
        if not dt.is_closing():
            dt.set_protocol(dst_protocol)
        if not t.is_closing():
            t.set_protocol(stream_protocol)
            cast(asyncio.ReadTransport, t).resume_reading()
    await dst.drain()

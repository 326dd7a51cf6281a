"""Small asyncio helpers shared by the bridge and the sidecar: endpoints, buffered streams, relays."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from ..core.http1 import HttpError, head_end, plausible_request_start
from ..errors import SidecarError

READ_CHUNK = 1024 * 1024
STREAM_LIMIT = 4 * 1024 * 1024


def parse_endpoint(endpoint: str) -> tuple[str, str | tuple[str, int]]:
    """`tcp://H:P` → ("tcp", (H, P)); `unix:///P` → ("unix", P)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/"):
            raise SidecarError(f"invalid endpoint {endpoint!r}: unix:// needs an absolute path (unix:///run/x.sock)")
        return "unix", path
    if endpoint.startswith("tcp://"):
        hp = endpoint[len("tcp://") :].rstrip("/")
        if hp.startswith("["):
            host, _, port = hp[1:].partition("]:")
        else:
            host, _, port = hp.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise SidecarError(f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT")
        return "tcp", (host, int(port))
    raise SidecarError(f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT or unix:///PATH")


async def open_endpoint(endpoint: str, timeout: float = 10.0):
    kind, addr = parse_endpoint(endpoint)
    if kind == "unix":
        coro = asyncio.open_unix_connection(addr, limit=STREAM_LIMIT)
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
        except Exception:  # noqa: BLE001
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


async def relay(a: Stream, b: Stream, idle: float, lifetime: float, act: Activity) -> str:
    """Relay both ways until both directions end, idle time or lifetime runs out."""
    t1 = asyncio.ensure_future(pump(a, b.w, act, "up"))
    t2 = asyncio.ensure_future(pump(b, a.w, act, "down"))
    start = time.monotonic()
    why = "closed"
    try:
        pending = {t1, t2}
        while pending:
            done, pending = await asyncio.wait(pending, timeout=min(idle, 5.0) / 2)
            now = time.monotonic()
            if pending and now - act.last > idle:
                why = "idle_timeout"
                break
            if pending and now - start > lifetime:
                why = "lifetime_exceeded"
                break
    finally:
        for t in (t1, t2):
            t.cancel()
        a.close()
        b.close()
    return why


def chmod_socket(path: str) -> None:
    os.chmod(path, 0o600)

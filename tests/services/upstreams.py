"""Loopback test servers that record what reached them (the far side of every proxy test)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from firma.core import http1


@dataclass
class Recorder:
    connections: int = 0
    requests: list = field(default_factory=list)  # (RequestHead, body bytes)
    raw: bytearray = field(default_factory=bytearray)


class HttpUpstream:
    """HTTP/1.1 origin on 127.0.0.1: answers each request with a JSON echo of what it got (or a
    fixed body), records heads and bodies. `body_size` serves a large body of that many bytes."""

    def __init__(self, *, body: bytes = b"hello", chunked_response: bool = False, close_delimited: bool = False, host: str = "127.0.0.1") -> None:
        self.host = host
        self.rec = Recorder()
        self.body = body
        self.chunked_response = chunked_response
        self.close_delimited = close_delimited
        self.server = None
        self.port = 0

    async def start(self) -> "HttpUpstream":
        self.server = await asyncio.start_server(self._client, self.host, 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.rec.connections += 1
        buf = bytearray()
        try:
            while True:
                while (end := http1.head_end(buf, 1 << 20)) is None:
                    chunk = await r.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                raw = bytes(buf[:end])
                del buf[:end]
                self.rec.raw += raw
                head = http1.parse_request_head(raw)
                fr = http1.request_framing(head)
                body = bytearray()
                if fr.kind == "length":
                    while len(buf) < fr.length:
                        chunk = await r.read(1 << 20)
                        if not chunk:
                            return
                        buf += chunk
                    body = buf[: fr.length]
                    del buf[: fr.length]
                elif fr.kind == "chunked":
                    sc = http1.ChunkedScanner()
                    raw_body = bytearray()
                    while not sc.done:
                        if not buf:
                            chunk = await r.read(65536)
                            if not chunk:
                                return
                            buf += chunk
                        n = sc.feed(bytes(buf))
                        raw_body += buf[:n]
                        del buf[:n]
                    body = raw_body
                self.rec.requests.append((head, bytes(body)))
                payload = self.body
                if self.chunked_response:
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
                elif self.close_delimited:
                    w.write(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
                    await w.drain()
                    return
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
                    if head.method != "HEAD":
                        mv = memoryview(payload)
                        for i in range(0, len(mv), 1 << 20):
                            w.write(mv[i : i + (1 << 20)])
                            await w.drain()
                await w.drain()
                if head.get("connection") == "close":
                    return
        except (ConnectionError, http1.HttpError):
            return
        finally:
            w.close()

    async def aclose(self) -> None:
        if self.server:
            self.server.close()


class RawUpstream:
    """Raw TCP (optionally TLS) server that records every byte it receives and echoes a digest
    or the bytes back. TLS uses a trustme certificate."""

    def __init__(self, *, ssl_ctx: ssl.SSLContext | None = None, echo: bool = False, reply: bytes | None = None) -> None:
        self.ssl_ctx = ssl_ctx
        self.echo = echo
        self.reply = reply
        self.connections = 0
        self.received = bytearray()
        self.done = asyncio.Event()
        self.server = None
        self.port = 0

    async def start(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.ssl_ctx, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, r, w) -> None:
        self.connections += 1
        try:
            if self.reply is not None:
                w.write(self.reply)
                await w.drain()
            while True:
                data = await r.read(1 << 20)
                if not data:
                    break
                self.received += data
                if self.echo:
                    w.write(data)
                    await w.drain()
            if self.echo is False and self.reply is None:
                import hashlib

                w.write(hashlib.sha256(self.received).hexdigest().encode())
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.done.set()
            w.close()

    async def aclose(self) -> None:
        if self.server:
            self.server.close()


def fake_resolver(table: dict[str, list[str]], calls: list | None = None):
    """A resolver coroutine factory: names absent from table fail like NXDOMAIN; records calls."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise OSError(f"fake resolver: no such name {host}")
        return list(table[host])

    return resolve


async def send_raw(port: int, data: bytes, *, read_until_close: bool = True, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    r, w = await asyncio.open_connection(host, port)
    w.write(data)
    await w.drain()
    out = bytearray()
    try:
        while True:
            chunk = await asyncio.wait_for(r.read(65536), timeout)
            if not chunk:
                break
            out += chunk
            if not read_until_close:
                break
    finally:
        w.close()
    return bytes(out)


def split_responses(data: bytes) -> list[tuple[http1.ResponseHead, bytes]]:
    """Parse a byte stream of Content-Length-framed responses."""
    out = []
    buf = bytes(data)
    while buf:
        end = http1.head_end(buf, 1 << 20)
        if end is None:
            break
        head = http1.parse_response_head(buf[:end])
        n = int((head.get_all("content-length") or ["0"])[0])
        out.append((head, buf[end : end + n]))
        buf = buf[end + n :]
    return out


ATTR = {
    "x-firma-sandbox-id": "sbx_0190aaaabbbbccccddddeeeeffff0000",
    "x-firma-session-id": "sess-real",
    "x-firma-profile": "generic",
    "x-firma-agent": "generic",
    "x-firma-user": "tester",
}


def audit_events(path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Stack:
    """Sidecar (+ bridge) on loopback with audit files under tmp; use `async with`."""

    def __init__(self, tmp, *, allow=(), policy_text=None, monitor=False, resolver=None, limits=None, attribution=None, bridge=True):
        from firma.services.sidecar import SidecarConfig, SidecarLimits

        self.tmp = tmp
        self.audit_path = str(tmp / "audit.jsonl")
        self.key_path = str(tmp / "audit.key")
        policy_path = None
        if policy_text is not None:
            policy_path = str(tmp / "policy.cedar")
            (tmp / "policy.cedar").write_text(policy_text)
        self.config = SidecarConfig(
            allow_hosts=tuple(allow), policy_path=policy_path, audit_path=self.audit_path, key_path=self.key_path,
            monitor=monitor, limits=limits or SidecarLimits(), connect_timeout=5.0, resolver=resolver,
        )
        self.attribution = dict(ATTR if attribution is None else attribution)
        self.with_bridge = bridge
        self.sidecar = self.bridge = None
        self.endpoint = ""
        self.sidecar_port = self.bridge_port = 0

    async def __aenter__(self) -> "Stack":
        from firma.services.bridge import Bridge
        from firma.services.sidecar import Sidecar

        self.sidecar = Sidecar(self.config)
        self.endpoint = await self.sidecar.start("tcp://127.0.0.1:0")
        self.sidecar_port = int(self.endpoint.rsplit(":", 1)[1])
        if self.with_bridge:
            self.bridge = Bridge(sidecar_endpoint=self.endpoint, attribution=self.attribution)
            self.bridge_port = await self.bridge.serve_address("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.bridge is not None:
            await self.bridge.aclose()
        await self.sidecar.aclose()

    def events(self) -> list[dict]:
        return audit_events(self.audit_path)


def run(coro):
    return asyncio.run(coro)

"""A minimal stand-in for firma.services (used only where the tests say so): a forward proxy that
allows listed hosts, a byte-pumping bridge, a REFUSED-only DNS stub. Loopback only."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

from firma.lifecycle import ServiceKit


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass


class FakeSidecar:
    def __init__(self, allow_hosts, **_kw):
        self.allow = set(allow_hosts)
        self.server = None
        self.requests: list[str] = []

    async def start(self, listen="tcp://127.0.0.1:0") -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"tcp://127.0.0.1:{port}"

    def dns_reporter(self, sandbox_id, session_id):
        return lambda name, qtype: None

    async def _handle(self, r, w):
        try:
            head = await r.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()
            return
        line = head.split(b"\r\n", 1)[0].decode()
        self.requests.append(line)
        method, target, _ = line.split(" ", 2)
        hostport = target.split("//", 1)[1].split("/", 1)[0]
        host = hostport.rsplit(":", 1)[0]
        if hostport not in self.allow and host not in self.allow:
            body = json.dumps({"denied": True, "reason": "host_not_allowed", "detail": hostport}).encode()
            w.write(b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nx-firma-deny-reason: host_not_allowed\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
            await w.drain()
            w.close()
            return
        h, p = hostport.rsplit(":", 1)
        ur, uw = await asyncio.open_connection(h, int(p))
        path = "/" + target.split("//", 1)[1].split("/", 1)[1] if "/" in target.split("//", 1)[1] else "/"
        rest = head.split(b"\r\n", 1)[1]
        uw.write(f"{method} {path} HTTP/1.1\r\n".encode() + rest)
        await uw.drain()
        await asyncio.gather(_pump(ur, w), _pump(r, uw))

    async def aclose(self):
        if self.server:
            self.server.close()


class FakeBridge:
    def __init__(self, sidecar_endpoint, attribution):
        self.endpoint = sidecar_endpoint
        self.servers = []

    async def _handle(self, r, w):
        host, port = self.endpoint[len("tcp://"):].rsplit(":", 1)
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            w.close()
            return
        await asyncio.gather(_pump(r, uw), _pump(ur, w))

    async def serve_sockets(self, socks):
        for s in socks:
            self.servers.append(await asyncio.start_server(self._handle, sock=s))

    async def serve_address(self, host="127.0.0.1", port=0):
        srv = await asyncio.start_server(self._handle, host, port)
        self.servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    async def aclose(self):
        for s in self.servers:
            s.close()


def _refused(q: bytes) -> bytes:
    return q[:2] + bytes([0x80 | (q[2] & 0x79), (q[3] & 0xF0) | 5]) + b"\0\0\0\0\0\0\0\0"


class FakeDnsStub:
    def __init__(self, on_query=None):
        self.on_query = on_query
        self.queries = 0
        self.transports = []

    async def serve_sockets(self, udp, tcp):
        loop = asyncio.get_running_loop()
        stub = self

        class P(asyncio.DatagramProtocol):
            def connection_made(self, t):
                self.t = t

            def datagram_received(self, data, addr):
                stub.queries += 1
                if len(data) >= 12:
                    self.t.sendto(_refused(data), addr)

        t, _ = await loop.create_datagram_endpoint(P, sock=udp)
        self.transports.append(t)
        self.transports.append(await asyncio.start_server(self._tcp, sock=tcp))

    async def serve_address(self, host="127.0.0.1", port=0):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        port = s.getsockname()[1]
        t = socket.socket()
        t.bind((host, port))
        t.listen()
        await self.serve_sockets(s, t)
        return port

    async def _tcp(self, r, w):
        n = struct.unpack("!H", await r.readexactly(2))[0]
        q = await r.readexactly(n)
        self.queries += 1
        a = _refused(q)
        w.write(struct.pack("!H", len(a)) + a)
        await w.drain()
        w.close()

    async def aclose(self):
        for t in self.transports:
            t.close()


async def probe(endpoint, timeout):
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    w.close()


def fake_kit() -> ServiceKit:
    return ServiceKit(
        make_sidecar=lambda **kw: FakeSidecar(**kw),
        make_bridge=lambda **kw: FakeBridge(**kw),
        make_dns_stub=lambda **kw: FakeDnsStub(**kw),
        probe_endpoint=probe,
    )

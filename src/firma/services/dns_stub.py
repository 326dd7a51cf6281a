"""DNS stub (DESIGN §8, §5.4): answers every query REFUSED over UDP and TCP, forwards nothing;
on the bwrap planted path, a name the policy could allow gets a synthetic address instead.

Serves sockets it is handed (planted inside a sandbox) or binds one port on an address for both
UDP and TCP. `on_query(qname, qtype)` is called for each parsed question; it must not block (the
sidecar's reporter is rate-bounded and never blocks) and its failures never reach the client."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from ..core import dnsmsg
from ..core.synthetic import TTL

MAX_TCP_FRAME = 4096  # a real query is a few hundred bytes; anything larger closes the connection
TCP_IDLE_SECS = 10.0
MAX_TCP_CLIENTS = 256
MAX_PENDING_CHECKS = 512  # datagrams awaiting attribution; beyond, dropped (a flood gets no answers)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, stub: "DnsStub") -> None:
        self.stub = stub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if self.stub.peers is not None:
            # Attribute the datagram first (off the loop); only the owner's are answered.
            task = asyncio.ensure_future(self._checked(data, addr))
            self.stub._conns.add(task)
            task.add_done_callback(self.stub._conns.discard)
            return
        self._reply(data, addr)

    async def _checked(self, data: bytes, addr) -> None:
        if len(self.stub._conns) > MAX_PENDING_CHECKS or not await self.stub.peers.allows(socket.IPPROTO_UDP, addr, None):
            return
        self._reply(data, addr)

    def _reply(self, data: bytes, addr) -> None:
        reply = self.stub._answer(data)
        if reply is not None and self.transport is not None:
            try:
                self.transport.sendto(reply, addr)
            except OSError:
                pass

    def error_received(self, exc: Exception) -> None:  # ICMP errors on send: ignore
        pass


class DnsStub:
    def __init__(self, *, on_query: Callable[..., None] | None = None, peers: Any = None,
                 names: Callable[[str], tuple[bytes, bytes] | None] | None = None) -> None:
        """`names(qname)`: the synthetic (IPv4, IPv6) addresses of a name the policy could
        allow, None to refuse it (transparent egress on the bwrap planted path, DESIGN §5.4);
        without it every query is refused. `on_query(qname, qtype, answered)` reports each."""
        self._on_query = on_query
        self._names = names
        self.answered = 0  # queries answered (REFUSED or synthetic), audited or not
        self.peers = peers  # services.peers.PeerUids on a host-loopback listener
        self._udp: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.Task] = set()
        self._tcp_clients = 0

    # -- core glue ------------------------------------------------------------------------
    def _answer(self, msg: bytes) -> bytes | None:
        q = dnsmsg.parse_question(msg)
        reply = None
        if q is not None and self._names is not None:
            addrs = self._names(q.qname.lower().rstrip("."))
            if addrs is not None:
                reply = dnsmsg.answer(msg, addrs[0], addrs[1], TTL)
        answered = reply is not None
        if reply is None:
            reply = dnsmsg.refusal(msg)
        if reply is not None:
            self.answered += 1
        if reply is not None and q is not None and self._on_query is not None:
            try:
                self._on_query(q.qname, q.qtype, answered)
            except Exception:  # noqa: BLE001 - reporting must never break the stub
                pass
        return reply

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        self._tcp_clients += 1
        try:
            if self._tcp_clients > MAX_TCP_CLIENTS:
                return
            if self.peers is not None:
                peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
                if not (peer and await self.peers.allows(socket.IPPROTO_TCP, peer, local)):
                    return
            buf = bytearray()
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), TCP_IDLE_SECS)
                if not chunk:
                    return
                buf += chunk
                msgs, oversize = dnsmsg.tcp_frames(buf, MAX_TCP_FRAME)
                for m in msgs:
                    reply = self._answer(m)
                    if reply is not None:
                        writer.write(dnsmsg.frame(reply))
                if msgs:
                    await writer.drain()
                if oversize:
                    return
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._tcp_clients -= 1
            if task is not None:
                self._conns.discard(task)
            writer.close()

    # -- public interface ---------------------------------------------------------------------
    async def serve_sockets(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        udp.setblocking(False)
        tcp.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._udp.append(transport)
        server = await asyncio.start_server(self._tcp_client, sock=tcp, limit=MAX_TCP_FRAME * 2)
        self._servers.append(server)

    async def serve_address(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind UDP and TCP on the same port (retrying when an ephemeral UDP port's TCP twin is taken)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        last: OSError | None = None
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((host, port))
                bound = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, bound))
                tcp.listen(128)
            except OSError as exc:
                udp.close()
                tcp.close()
                last = exc
                if port:
                    raise
                continue
            await self.serve_sockets(udp, tcp)
            return bound
        raise OSError(f"could not bind a DNS stub UDP+TCP port pair on {host}: {last}")

    async def aclose(self) -> None:
        for t in self._udp:
            t.close()
        for s in self._servers:
            s.close()
        for task in list(self._conns):
            task.cancel()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - a client that fails in any way only ends its own connection
                pass
        self._udp.clear()
        self._servers.clear()

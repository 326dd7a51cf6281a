"""Transparent egress, the services side (DESIGN §5.4): the listeners planted on every address
inside the sandbox, served from outside.

An accepted connection's own address (`getsockname`) is where the agent dialled: a synthetic
address stands for the name the DNS stub answered with it, any other address is an IP literal.
With the embedded sidecar the connection is decided and relayed here, in the services process,
by the sidecar's own code (`Sidecar.transparent`: one hop). With an external sidecar it goes to
it as `CONNECT name:port` through the bridge, so that sidecar decides it too.

The DNS side lives here too: `names_for(policy, …)` is what the stub asks for each name."""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

from ..core import synthetic
from ..core.hostcanon import CanonHost, HostError, canon_host
from ..core.policy import Policy
from ..core.wire import Attribution
from . import netio

Decide = Callable[[Attribution, netio.Stream, CanonHost, int], Awaitable[None]]
Refuse = Callable[[Attribution, str, str], None]  # (ctx, resource, reason): audited, nothing answered
MAX_CONNECTIONS = 2048


def names_for(policy: Policy | None, ports: tuple[int, ...], agent_id: str, table: synthetic.SyntheticNames,
              *, answer_all: bool = False) -> Callable[[str], tuple[bytes, bytes] | None]:
    """What the DNS stub answers for a name: its synthetic (IPv4, IPv6) pair when some rule could
    allow it on a planted port (or always, `answer_all`: monitor mode), else None (REFUSED).
    Verdicts are kept per name: a name asked again gets the same answer at once."""
    seen: dict[str, bool] = {}

    def answer(qname: str) -> tuple[bytes, bytes] | None:
        ok = seen.get(qname)
        if ok is None:
            try:
                host = canon_host(qname)
            except HostError:
                return None
            ok = host.kind == "name" and (answer_all or (policy is not None and policy.could_allow(host.host, ports, agent_id)))
            if len(seen) < synthetic.MAX_NAMES:
                seen[qname] = ok
        if not ok:
            return None
        pair = table.addresses(qname)
        return None if pair is None else (pair[0].packed, pair[1].packed)

    return answer


class TransparentEgress:
    def __init__(self, *, names: synthetic.SyntheticNames, ctx: Attribution, decide: Decide, refuse: Refuse) -> None:
        self.names = names
        self.ctx = ctx
        self._decide = decide
        self._refuse = refuse
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    async def serve_sockets(self, socks: tuple[socket.socket, ...]) -> None:
        for sock in socks:
            sock.setblocking(False)
            server = await asyncio.start_server(self._client, sock=sock, limit=netio.STREAM_LIMIT, backlog=1024)
            self._servers.append(server)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._tasks.add(task)
        s = netio.Stream(reader, writer)
        try:
            netio.nodelay(writer)
            local = writer.get_extra_info("sockname")
            addr, port = str(local[0]), int(local[1])
            name = self.names.name_of(addr)
            if name is None and synthetic.is_synthetic(addr):
                # never handed out in this run: no name to stand for, and never dialled
                self._refuse(self.ctx, f"{addr}:{port}", "synthetic_address_unknown")
                return
            try:
                host = canon_host(name if name is not None else _unmapped(addr))
            except HostError:
                self._refuse(self.ctx, f"{addr}:{port}", "invalid_host")
                return
            await self._decide(self.ctx, s, host, port)
        except (OSError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            s.close()
            self._tasks.discard(task)

    async def aclose(self) -> None:
        await netio.close_servers(self._servers, self._tasks)


def _unmapped(addr: str) -> str:
    """An IPv4-mapped IPv6 address as its IPv4 (the v6 listener is IPv6-only, so this is rare)."""
    low = addr.lower()
    return addr[7:] if low.startswith("::ffff:") and "." in addr else addr.split("%", 1)[0]

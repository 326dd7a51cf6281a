"""`--publish` (DESIGN §5.7): a port the agent listens on inside, reachable on the host.

The host side listens where the user said (loopback unless another bind address was named); for
each connection the services process takes a fresh socket of the sandbox's network namespace
from the socket factory the launcher planted (a helper in that namespace, holding nothing else)
and connects it to the agent's port there, from outside: nothing runs or is added inside. Each
connection is audited as `network.inbound` with its bytes."""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

from ..core import auditfmt
from ..core.model import Publish
from . import netio

IDLE_SECS = 3600.0
Audit = Callable[[str, int, str, int], None]  # (resource, decision, reason, bytes to the host)


class Published:
    def __init__(self, factory: socket.socket, audit: Audit) -> None:
        self._factory = factory
        self._factory.setblocking(True)
        self._audit = audit
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, listeners: list[tuple[socket.socket, Publish]]) -> None:
        for sock, pub in listeners:
            sock.setblocking(False)
            server = await asyncio.start_server(self._handler(pub), sock=sock, limit=netio.STREAM_LIMIT, backlog=256)
            self._servers.append(server)

    def _handler(self, pub: Publish):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._client(reader, writer, pub)
        return handle

    def _inner_socket(self) -> socket.socket:
        # The helper answers at once (it only calls socket()); a blocking exchange of microseconds.
        self._factory.send(b"S")
        _msg, fds, _f, _a = socket.recv_fds(self._factory, 16, 1)
        if len(fds) != 1:
            raise OSError("the --publish helper handed out no socket")
        return socket.socket(fileno=fds[0])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pub: Publish) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        resource = f"{pub.bind}:{pub.host_port} -> sandbox:{pub.port} from {peer[0] if peer else '?'}"
        outer = netio.Stream(reader, writer)
        inner = None
        try:
            s = self._inner_socket()
            s.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", pub.port)), 10)
            except (OSError, TimeoutError):
                s.close()
                self._audit(resource, auditfmt.ABORT, "nothing_listening", 0)  # the agent does not listen there
                return
            r, w = await asyncio.open_connection(sock=s, limit=netio.STREAM_LIMIT)
            inner = netio.Stream(r, w)
            act = netio.Activity()
            why = await netio.relay(outer, inner, IDLE_SECS, IDLE_SECS * 24, act)
            self._audit(resource, auditfmt.ALLOW, "" if why == "closed" else why, act.down)
        except (OSError, ConnectionError):
            self._audit(resource, auditfmt.ABORT, "relay_failed", 0)
        finally:
            outer.close()
            if inner is not None:
                inner.close()
            self._tasks.discard(task)

    async def aclose(self) -> None:
        await netio.close_servers(self._servers, self._tasks)
        self._factory.close()

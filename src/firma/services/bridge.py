"""Bridge (DESIGN §3, §9): the only endpoint the agent talks to.

Per agent connection: read one request head at a time (≤128 KiB), refuse non-UTF-8/malformed
heads (closed and audited), strip every x-firma-* attribution header the agent sent and append the
trusted values, forward head and body (Content-Length or chunked, exactly) to the sidecar over one
connection; after CONNECT, relay raw bytes both ways. Responses are relayed as the sidecar framed
them; the sidecar decides each pipelined request in order."""

from __future__ import annotations

import asyncio
import base64
import hmac
import socket
from typing import Any, Mapping

from ..core import auditfmt, http1
from ..core import wire
from ..core.endpoint import parse_endpoint
from ..core.wire import REPORT_METHOD, REPORT_REASON, deny_response
from ..core.http1 import HttpError
from . import netio

HEAD_TIMEOUT = 300.0  # between requests on a keep-alive connection
TUNNEL_IDLE = 24 * 3600.0  # backstop only: the sidecar cuts idle tunnels much earlier


class Bridge:
    def __init__(
        self,
        *,
        sidecar_endpoint: str,
        attribution: Mapping[str, str],
        audit: Any = None,
        max_head: int = http1.MAX_HEAD,
        max_connections: int = 1024,
        peers: Any = None,
        sidecar_tls: Any = None,
        credential: str | None = None,
    ) -> None:
        parse_endpoint(sidecar_endpoint)  # fail early on a bad endpoint
        self.sidecar_endpoint = sidecar_endpoint
        self.attribution = dict(attribution)
        self.audit = audit  # optional AuditWriter-like (.submit(**fields)); else reported via the sidecar
        self.max_head = max_head
        self.max_connections = max_connections
        # services.peers.PeerUids on a host-loopback listener: only the owner's sockets are served
        self.peers = peers
        self.sidecar_tls = sidecar_tls  # an SSLContext: mutual TLS to an external sidecar
        # A per-run bridge credential (`user:secret`, sent by proxy clients from the userinfo of
        # proxy_url as Proxy-Authorization: Basic): where the peer's uid cannot be looked up
        # (macOS), it is what tells the agent's requests from another local user's. It is not a
        # firma capability: it opens this run's bridge and nothing else.
        self._expected_auth = (
            "Basic " + base64.b64encode(credential.encode()).decode() if credential is not None else None
        )
        self.refused_credentials = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    async def serve_sockets(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            sock.setblocking(False)
            server = await asyncio.start_server(self._client, sock=sock, limit=netio.STREAM_LIMIT, backlog=1024)
            self._servers.append(server)

    async def serve_address(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = await asyncio.start_server(self._client, host, port, limit=netio.STREAM_LIMIT, backlog=1024)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        await netio.close_servers(self._servers, self._tasks)

    # ------------------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.peers is not None:
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            if not (peer and await self.peers.allows(socket.IPPROTO_TCP, peer, local)):
                writer.transport.abort()  # another user's connection: no answer, no audit line
                return
        task = asyncio.current_task()
        if len(self._tasks) >= self.max_connections:
            # Bounded: an agent cannot exhaust the launcher's descriptors through the bridge.
            writer.write(deny_response(503, "too_many_connections", "bridge connection limit reached"))
            writer.close()
            return
        assert task is not None  # a client callback runs in its own task
        self._tasks.add(task)
        netio.nodelay(writer)
        agent = netio.Stream(reader, writer)
        up: netio.Stream | None = None
        down: asyncio.Task | None = None

        async def ensure_up(relay_down: bool = True) -> netio.Stream:
            nonlocal up, down
            if up is None:
                r, w = await netio.open_endpoint(self.sidecar_endpoint, 10.0, self.sidecar_tls)
                up = netio.Stream(r, w)
                if relay_down:
                    down = asyncio.ensure_future(self._downstream(up, agent))
            return up

        try:
            while True:
                if down is not None and down.done():
                    break  # the sidecar ended the exchange (deny, close-delimited response)
                try:
                    raw = await asyncio.wait_for(agent.read_head(self.max_head, request=True), HEAD_TIMEOUT)
                except HttpError as exc:
                    await self._reject(agent, ensure_up, exc.reason, exc.detail, up, down)
                    return
                except asyncio.IncompleteReadError:
                    await self._reject(agent, ensure_up, "malformed_request", "connection closed inside a request head", up, down)
                    return
                except asyncio.TimeoutError:
                    break
                if raw is None:
                    break
                try:
                    head = http1.parse_request_head(raw)
                    if head.method == REPORT_METHOD:
                        raise HttpError("malformed_request", "reserved method")
                    framing = http1.request_framing(head) if head.method != "CONNECT" else http1.Framing("none")
                except HttpError as exc:
                    await self._reject(agent, ensure_up, exc.reason, exc.detail, up, down)
                    return
                if self._expected_auth is not None:
                    given = head.get_all("proxy-authorization")
                    if len(given) != 1 or not hmac.compare_digest(given[0].strip(), self._expected_auth):
                        self.refused_credentials += 1  # counted, never audited (anyone can knock)
                        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                     b'Proxy-Authenticate: Basic realm="firma"\r\ncontent-length: 0\r\n'
                                     b"connection: close\r\n\r\n")
                        return
                    head = head.without(frozenset({"proxy-authorization"}))
                stamped = http1.stamp_attribution(head, self.attribution)
                # A CONNECT opening the connection becomes one direct tunnel (fast relay both ways).
                tunnel = head.method == "CONNECT" and up is None
                try:
                    u = await ensure_up(relay_down=not tunnel)
                except (OSError, asyncio.TimeoutError) as exc:
                    self._audit_local("sidecar_unreachable")
                    writer.write(deny_response(502, "sidecar_unreachable", f"policy sidecar unreachable: {exc}"))
                    return
                u.w.write(stamped.to_bytes())
                if tunnel:
                    # Raw from here on; the sidecar enforces idle and lifetime limits and closes.
                    await netio.relay(agent, u, TUNNEL_IDLE, TUNNEL_IDLE, netio.Activity())
                    return
                if head.method == "CONNECT":
                    await netio.pump(agent, u.w, None, "up")  # raw from here on, both ways
                    if down is not None:
                        await down
                    return
                ok = await self._forward_body(agent, u, framing)
                if not ok:
                    break  # the sidecar saw the same bad bytes and answers/audits it
        except (OSError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if up is not None:
                try:
                    if up.w.can_write_eof() and not up.w.is_closing():
                        up.w.write_eof()
                except (OSError, RuntimeError):
                    pass
                if down is not None:
                    try:
                        await asyncio.wait_for(asyncio.shield(down), 30)
                    except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - the sidecar went away in any way: the agent's request ends, the bridge serves on
                        down.cancel()
                up.close()
            try:
                await agent.linger_close()  # an error response must not be lost to a reset
            except asyncio.CancelledError:
                agent.close()
            self._tasks.discard(task)

    async def transparent(self, _ctx: Any, agent: netio.Stream, host: Any, port: int) -> None:
        """A connection a planted transparent listener accepted (DESIGN §5.4), with an external
        sidecar: sent to it as `CONNECT host:port` with this run's attribution, so it decides
        it as it decides any tunnel; relayed raw once it answers 200, closed otherwise."""
        authority = host.authority(port)
        try:
            r, w = await netio.open_endpoint(self.sidecar_endpoint, 10.0, self.sidecar_tls)
        except (OSError, asyncio.TimeoutError):
            self._audit_local("sidecar_unreachable")
            return
        up = netio.Stream(r, w)
        try:
            head = http1.RequestHead("CONNECT", authority, "HTTP/1.1", (("host", authority),))
            up.w.write(http1.stamp_attribution(head, self.attribution).to_bytes())
            raw = await asyncio.wait_for(up.read_head(self.max_head), 60)
            if raw is None or http1.parse_response_head(raw).status != 200:
                return  # refused: the sidecar audited it
            await netio.relay(agent, up, TUNNEL_IDLE, TUNNEL_IDLE, netio.Activity())
        except (HttpError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            up.close()

    def refuse_transparent(self, _ctx: Any, _resource: str, reason: str) -> None:
        """A transparent connection refused before reaching the external sidecar."""
        self._audit_local(reason)

    async def _downstream(self, up: netio.Stream, agent: netio.Stream) -> None:
        """Sidecar → agent, raw. When the sidecar closes, the agent's side is half-closed (pump
        writes EOF) and fully closed a moment later, so unread pipelined bytes cannot reset the
        connection before the agent has read the last response."""
        await netio.pump(up, agent.w, None, "down")
        asyncio.get_running_loop().call_later(1.0, agent.close)

    async def _forward_body(self, agent: netio.Stream, u: netio.Stream, framing: http1.Framing) -> bool:
        if framing.kind == "length":
            left = framing.length
            while left:
                data = await agent.read_some(min(left, netio.READ_CHUNK))
                if not data:
                    return False
                left -= len(data)
                u.w.write(data)
                await u.w.drain()
        elif framing.kind == "chunked":
            scanner = http1.ChunkedScanner()
            while not scanner.done:
                data = await agent.read_some()
                if not data:
                    return False
                try:
                    n = scanner.feed(data)
                except HttpError:
                    u.w.write(data)  # the sidecar's identical scanner rejects and audits it
                    await u.w.drain()
                    return False
                if n < len(data):
                    agent.buf[:0] = data[n:]
                u.w.write(data[:n])
                await u.w.drain()
        return True

    def _audit_local(self, reason: str) -> None:
        if self.audit is not None:
            self.audit.submit(
                session_id=self.attribution.get(wire.SESSION_ID, ""),
                agent_id=self.attribution.get(wire.AGENT, ""),
                sandbox_id=self.attribution.get(wire.SANDBOX_ID, ""),
                action="http.malformed",
                decision=auditfmt.DENY,
                deny_reason=reason,
                provenance="firma-bridge",
            )

    async def _reject(self, agent: netio.Stream, ensure_up, reason: str, detail: str, up, down) -> None:
        """A malformed head: nothing of it is forwarded; the decision is audited (through the
        sidecar unless this bridge has its own audit writer) and the agent connection closes
        after any response still in flight."""
        if down is not None and down.done():
            return  # the sidecar already closed this exchange; nothing more is forwarded
        if self.audit is not None:
            self._audit_local(reason)
            if up is not None:
                if up.w.can_write_eof():
                    up.w.write_eof()
                if down is not None:
                    await down
            agent.w.write(deny_response(400, reason, detail))
            return
        try:
            u = await ensure_up()
        except (OSError, asyncio.TimeoutError):
            agent.w.write(deny_response(400, reason, detail))
            return
        report = http1.RequestHead(REPORT_METHOD, "/malformed", "HTTP/1.1", ((REPORT_REASON, reason),))
        u.w.write(http1.stamp_attribution(report, self.attribution).to_bytes())
        if u.w.can_write_eof():
            u.w.write_eof()

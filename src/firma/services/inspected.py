"""An inspected connection (DESIGN §5.7): the agent's TLS terminated with a leaf of firma's CA,
every request on it decided by the policy with what only a request shows, credentials swapped
in, and relayed over a verified TLS connection to the real upstream, kept alive between
requests.

Per request: parse strictly → Host must name the connection's host → a placeholder anywhere it
may not go is refused → decide (method, normal path, context) → inject the bound credentials
into their header → forward (body scanned for placeholders) → relay the response (the secret
replaced by its placeholder for every credential bound to the host). One signed audit line
per request."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..core import auditfmt, http1, urlpath
from ..core.credentials import Broker
from ..core.hostcanon import CanonHost, HostError, split_authority
from ..core.http1 import HOP_BY_HOP, HttpError
from ..core.policy import HTTP_REQUEST, NETWORK_CONNECT, request_context
from ..core.wire import ATTRIBUTION_HEADERS, HEADER_PREFIX, Attribution, deny_response
from . import bodies, netio, tlsterm
from .bodies import EXFILTRATION

if TYPE_CHECKING:
    import ssl

    from .leafcerts import LeafMint
    from .sidecar import Sidecar

INJECTED = "credential_injected"  # label of an allowed request that carried a credential


class Inspector:
    """The inspected path of one sidecar: its leaf certificates, upstream trust and broker."""

    def __init__(self, sidecar: Sidecar, mint: LeafMint, upstream: ssl.SSLContext, broker: Broker) -> None:
        self.sc = sidecar
        self.mint = mint
        self.upstream = upstream
        self.broker = broker

    async def serve(self, ctx: Attribution, s: netio.Stream, host: CanonHost, port: int) -> None:
        """`s`: an accepted connection to `host:port` whose ClientHello (its SNI naming `host`)
        has been read into `s.buf`."""
        sc = self.sc
        resource = host.authority(port)
        t0 = time.perf_counter_ns()
        try:
            leaf = await asyncio.get_running_loop().run_in_executor(None, self.mint.context_for, host.host)
            agent = await tlsterm.terminate(s, leaf, sc.limits.setup_timeout)
        except tlsterm.TlsFailed as exc:
            # Most often: the agent's client does not trust firma's CA (pinned, or its own roots).
            sc.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY, reason=exc.reason, t0=t0)
            return
        session = _Session(self, ctx, agent, host, port)
        try:
            await session.run()
        finally:
            session.close()


class _Session:
    def __init__(self, ins: Inspector, ctx: Attribution, agent: netio.Stream, host: CanonHost, port: int) -> None:
        self.ins, self.sc, self.ctx = ins, ins.sc, ctx
        self.agent = agent
        self.host, self.port = host, port
        self.up: netio.Stream | None = None
        self.shown = host.host if port == 443 else host.authority(port)

    def close(self) -> None:
        if self.up is not None:
            self.up.close()
            self.up = None
        self.agent.close()

    async def run(self) -> None:
        lim = self.sc.limits
        while True:
            try:
                raw = await asyncio.wait_for(self.agent.read_head(lim.max_head_bytes, request=True), lim.idle_timeout)
            except (HttpError, asyncio.IncompleteReadError):
                self.sc.malformed(self.ctx, self.agent, "malformed_request", "not an HTTP/1.1 request (inspected)")
                return
            except (asyncio.TimeoutError, OSError, ConnectionError):
                return
            if raw is None:
                return
            t0 = time.perf_counter_ns()
            try:
                head = http1.parse_request_head(raw)
            except HttpError as exc:
                self.sc.malformed(self.ctx, self.agent, exc.reason, exc.detail)
                return
            if not await self.one(head, t0):
                return

    def deny(self, resource: str, reason: str, detail: str, status: int, t0: int, decision: int = auditfmt.DENY) -> bool:
        self.sc.audit_event(self.ctx, action=HTTP_REQUEST, resource=resource, decision=decision, reason=reason, t0=t0)
        try:
            self.agent.w.write(deny_response(status, reason, detail))
        except (OSError, RuntimeError):
            pass
        return False

    async def one(self, head: http1.RequestHead, t0: int) -> bool:
        """One request; True when the connection may carry another."""
        sc, host, port = self.sc, self.host, self.port
        target = head.target
        path_noq = http1.strip_query(target.split("#", 1)[0])
        resource = auditfmt.request_resource(head.method, f"https://{self.shown}{path_noq}")
        if not target.startswith("/") or head.method == "CONNECT":
            return self.deny(auditfmt.request_resource(head.method, f"https://{self.shown}"), "malformed_request", "an inspected connection carries origin-form requests", 400, t0)
        hosts = head.get_all("host")
        if len(hosts) > 1:
            return self.deny(resource, "duplicate_host", "more than one Host header", 403, t0)
        if hosts:
            try:
                hh, hp = split_authority(hosts[0], 443)
            except HostError:
                hh, hp = None, 0
            if hh != host or hp != port:
                # Inside one TLS connection every request names the host its SNI named.
                return self.deny(resource, "host_mismatch", "Host header does not match the connection's server name", 403, t0)
        try:
            framing = http1.request_framing(head)
        except HttpError as exc:
            return self.deny(resource, exc.reason, exc.detail, 400, t0)
        if framing.kind == "length" and framing.length > sc.limits.max_body_bytes:
            return self.deny(resource, "body_too_large", f"body exceeds {sc.limits.max_body_bytes} bytes", 413, t0)
        if sc.policy.has_path_rules and urlpath.ambiguous(path_noq):
            return self.deny(resource, "ambiguous_path",
                             "the path has dot segments or doubled slashes, which servers resolve differently", 403, t0)
        broker = self.ins.broker
        stray = broker.stray(host.host, port, target=target, headers=head.headers)
        if stray:
            return self.deny(resource, f"{EXFILTRATION}:{stray}",
                             f"the placeholder of credential {stray} may not go here", 403, t0)
        held, why = await bodies.hold(self.agent, framing, idle=sc.limits.idle_timeout, needles=broker.needles(),
                                      expects_continue=http1.expects_continue(head))
        if why:
            return self.deny(resource, why, "a credential's placeholder may not go here" if why.startswith(EXFILTRATION)
                             else "the agent closed before the end of the body", 403 if why.startswith(EXFILTRATION) else 400, t0)
        context = request_context(
            inspected=True, scheme="https", query_params=urlpath.query_names(target),
            content_type=(head.get("content-type") or "")[:256],
            content_length=framing.length if framing.kind == "length" else -1)
        v = await sc.authorize(HTTP_REQUEST, host, port, head.method, urlpath.normalize(path_noq), self.ctx.agent_id,
                               context, resolve=self.up is None)
        if not v.allowed:
            return self.deny(resource, sc.audited_reason(v), v.detail, v.status, t0,
                             auditfmt.ABORT if v.status in (502, 504) else auditfmt.DENY)
        headers, injected = broker.inject(head.headers, host.host, port)
        enforce_us = (time.perf_counter_ns() - t0) // 1000
        t_dispatch = time.perf_counter_ns()
        if self.up is None:
            try:
                self.up = await tlsterm.dial(v.addrs, port, host.host, self.ins.upstream, sc.config.connect_timeout)
            except tlsterm.TlsFailed as exc:
                return self.deny(resource, exc.reason, f"{host.host}: {exc.detail}", 502, t0, auditfmt.ABORT)
            except OSError as exc:
                return self.deny(resource, "upstream_unreachable", str(exc), 502, t0, auditfmt.ABORT)
        labels = [f"monitor_mode:{v.monitored}"] if v.monitored else []
        labels += [f"{INJECTED}:{n}" for n in injected]
        status, size, keep, abort = 0, 0, False, "shutdown"
        try:
            # Every credential bound here, injected or not: the host may show a secret it holds anyway.
            shielded = tuple(c.name for c in broker.bound(host.host, port))
            status, size, keep, abort = await self.exchange(head, headers, framing, shielded, held)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            abort = f"relay_failed: {type(exc).__name__}"
        except HttpError as exc:
            abort = exc.reason
        finally:
            if abort or not keep:
                if self.up is not None:
                    self.up.close()
                    self.up = None
            sc.audit.submit(
                session_id=self.ctx.session_id, agent_id=self.ctx.agent_id, sandbox_id=self.ctx.sandbox_id,
                action=HTTP_REQUEST, resource=resource,
                decision=auditfmt.DENY if abort.startswith(EXFILTRATION) else auditfmt.ABORT if abort else auditfmt.ALLOW,
                deny_reason=abort or ",".join(labels), enforcement_latency_us=enforce_us,
                bundle_version=sc.policy.version, context_hash=auditfmt.context_hash(head.method, resource),
                dispatch_status=status, dispatch_latency_us=(time.perf_counter_ns() - t_dispatch) // 1000,
                response_size=size,
            )
        if abort.startswith(EXFILTRATION):
            self.agent.w.write(deny_response(403, abort, "a credential's placeholder may not go here"))
        return keep and not abort

    async def exchange(self, head: http1.RequestHead, headers: tuple[tuple[str, str], ...], framing: http1.Framing,
                       shielded: tuple[str, ...], held: bytes | None) -> tuple[int, int, bool, str]:
        up = self.up
        assert up is not None
        tokens = {t.strip().lower() for v in head.get_all("connection") for t in v.split(",")}
        upgrade = "upgrade" in tokens and bool(head.get("upgrade"))
        drop = set(ATTRIBUTION_HEADERS) | HOP_BY_HOP | tokens
        drop |= {k.lower() for k, _ in headers if k.lower().startswith(HEADER_PREFIX)}
        if shielded:
            drop.add("accept-encoding")  # a secret is found in a response only uncompressed
        out = http1.RequestHead(head.method, head.target, "HTTP/1.1", headers).without(drop)
        extra: list[tuple[str, str]] = []
        if not head.get("host"):
            extra.append(("Host", self.shown))
        if shielded:
            extra.append(("Accept-Encoding", "identity"))
        if upgrade:
            extra += [("Connection", "Upgrade"), ("Upgrade", head.get("upgrade") or "")]
        out = out.with_added(extra)
        up.w.write(out.to_bytes())
        body = asyncio.ensure_future(self.send_body(framing, held))
        client_keep = head.version == "HTTP/1.1" and "close" not in tokens
        try:
            result = await self.relay_response(head.method, client_keep, shielded, upgrade)
        except BaseException:
            if body.done() and not body.cancelled() and body.exception() is None and body.result():
                return 0, 0, False, body.result()  # the refused body explains the upstream's end
            body.cancel()
            raise
        if result is None:  # switched protocols: relayed as bytes until either side ends
            body.cancel()
            act = netio.Activity()
            await netio.relay(self.agent, up, self.sc.limits.idle_timeout, self.sc.limits.max_tunnel_secs, act)
            self.up = None
            return 101, act.down, False, ""
        status, size, keep = result
        body_err = ""
        if body.done():
            body_err = body.result()
        else:
            body.cancel()  # answered before the whole body: the agent's stream is out of step
            client_keep = False
        return status, size, keep and client_keep and not body_err, body_err

    async def send_body(self, framing: http1.Framing, held: bytes | None) -> str:
        """Forward the request body; a placeholder in it stops it before its last byte (refused)."""
        assert self.up is not None
        lim = self.sc.limits
        return await bodies.send_request_body(self.agent, self.up, framing, max_body=lim.max_body_bytes,
                                              idle=lim.idle_timeout, needles=self.ins.broker.needles(), held=held)

    async def relay_response(self, method: str, client_keep: bool, shielded: tuple[str, ...],
                             upgrade: bool) -> tuple[int, int, bool] | None:
        up, agent, lim = self.up, self.agent, self.sc.limits
        assert up is not None
        while True:
            raw = await asyncio.wait_for(up.read_head(lim.max_head_bytes), lim.idle_timeout)
            if raw is None:
                raise ConnectionError("upstream closed without a response")
            resp = http1.parse_response_head(raw)
            if resp.status == 101:
                if not upgrade:
                    raise ConnectionError("upstream switched protocols unasked")
                agent.w.write(raw)
                await agent.w.drain()
                return None
            if 100 <= resp.status < 200:
                agent.w.write(raw)
                continue
            break
        framing = http1.response_framing(resp, method)
        keep = framing.kind != "close"
        replacer = self.ins.broker.response_replacer(shielded)
        drop = {"connection", "keep-alive", "proxy-connection"}
        headers = resp.headers
        if replacer is not None:
            headers = tuple((k, replacer.whole(v)) for k, v in headers)
        rechunk = replacer is not None and framing.kind != "none"
        if resp.get_all("transfer-encoding") or rechunk:
            drop.add("content-length")  # never two framings; a replaced body changes length
        if rechunk:
            drop.add("transfer-encoding")
        out = http1.ResponseHead("HTTP/1.1", resp.status, resp.reason, headers).without(drop)
        extra = [("Transfer-Encoding", "chunked")] if rechunk else []
        if not keep or not client_keep:
            extra.append(("Connection", "close"))
        agent.w.write(out.with_added(extra).to_bytes())
        size = 0
        stream: Any = None if replacer is None else replacer.stream()
        if stream is None and framing.kind == "length":
            await netio.forward_counted(up, agent.w, framing.length, lim.idle_timeout)
            return resp.status, framing.length, keep
        async for data in bodies.response_body(up, framing, lim.idle_timeout, decode=stream is not None):
            size += len(data)
            if stream is not None:
                data = stream.feed(data)
                if data:
                    agent.w.write(bodies.chunk(data))
            else:
                agent.w.write(data)
            await agent.w.drain()
        if stream is not None and framing.kind != "none":
            tail = stream.flush()
            agent.w.write((bodies.chunk(tail) if tail else b"") + bodies.LAST_CHUNK)
        await agent.w.drain()
        return resp.status, size, keep


__all__ = ["Inspector", "EXFILTRATION", "INJECTED"]

"""Policy sidecar (DESIGN §9): HTTP/1.1 forward proxy for absolute-form requests and CONNECT.

Order for every request: parse strictly → canonicalize the target → decide on the *name* →
resolve → refuse non-public addresses unless host:port is allowed exactly → dial exactly a
checked address. Attribution comes from the bridge's x-firma-* headers (the sidecar listens only
where agents cannot reach) and is stripped before upstream. One signed audit line per decision."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from typing import Any, Awaitable, Callable, Mapping

from ..core import synthetic
from ..core import addrclass, auditcaps, auditfmt, http1, tlshello, urlpath
from ..core.endpoint import HEALTH_PATH, parse_endpoint
from ..core.hostcanon import CanonHost, HostError, canon_host, split_authority
from ..core.http1 import HOP_BY_HOP, HttpError
from ..core.wire import (
    ATTRIBUTION_HEADERS,
    HEADER_PREFIX,
    REPORT_METHOD,
    REPORT_REASON,
    Attribution,
    attribution_of,
    deny_response,
)
from ..core.model import RunPlan
from ..core.policy import HTTP_REQUEST, NETWORK_CONNECT, Policy, Request, parse_pattern, request_context
from ..core.record import record, field
from ..errors import SidecarError
from .listen import LISTEN_BACKLOG, bind_unix_listener
from . import bodies, netio
from .bodies import EXFILTRATION
from .audit_writer import AuditWriter
from .audit_files import free_bytes
from ..core.auditcaps import AuditCaps
from ..core.credentials import Broker, Credential
from ..core.inspection import InspectionRules

Resolver = Callable[[str, int], Awaitable[list[str]]]
DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


@record
class SidecarLimits:
    max_head_bytes: int = http1.MAX_HEAD
    max_body_bytes: int = 1 << 30  # plain-HTTP request bodies; tunnels are bounded by time
    max_connections: int = 2048
    # Per client (its uid, its certificate, else its address), for a sidecar serving several
    # launchers: one cannot take every connection and lock the others out. None: no such cap
    # (the embedded sidecar has one client, its own bridge).
    max_connections_per_client: int | None = None
    # Requests per second per client (a token bucket with twice that as burst); None: unlimited.
    requests_per_client_per_sec: float | None = None
    setup_timeout: float = 10.0  # first request head / TLS ClientHello
    idle_timeout: float = 300.0
    max_tunnel_secs: float = 24 * 3600.0
    dns_events_per_sec: float = 50.0
    dns_burst: int = 200


@record
class SidecarConfig:
    allow_hosts: tuple[str, ...]
    policy_path: str | None
    audit_path: str
    key_path: str
    monitor: bool = False
    limits: SidecarLimits = field(default_factory=SidecarLimits)
    connect_timeout: float = 10.0
    # Injectable name resolution (tests): (host, port) -> list of IP strings. Default: getaddrinfo.
    resolver: Resolver | None = None
    # Opaque TCP destinations (`allow_tcp`, exact HOST:PORT): allowed, and their tunnels carry any
    # protocol (server-speaks-first included), uninspected and labelled so in the audit.
    allow_tcp: tuple[str, ...] = ()
    # Client uids served (the standalone sidecar: its owner plus `--allow-uid`); None serves any
    # client that can reach the listener (the embedded one's is a 0700 directory of the launcher's).
    client_uids: frozenset[int] | None = None
    # Audit bounds (core.auditcaps defaults) and the free-space measurement (injectable in tests).
    audit_caps: AuditCaps = field(default_factory=AuditCaps)
    audit_free_space: Callable[[str], int] = free_bytes
    # HTTPS inspection and credential brokering (DESIGN §5.7; the embedded sidecar only): which
    # destinations are terminated, with leaves of the CA in `ca` (key, cert paths), minted in
    # `private_dir`; the run's credentials (their secrets live only in this process).
    inspection: InspectionRules | None = None
    ca: tuple[str, str] | None = None
    private_dir: str | None = None
    credentials: tuple[Credential, ...] = ()

    @classmethod
    def for_run(cls, plan: RunPlan, *, audit_path: str, key_path: str, launcher_uid: int,
                inspection: Any = None) -> SidecarConfig:
        """The embedded sidecar's configuration for a `firma run` (both ways of hosting it): it
        serves only the launcher's uid. `inspection`: the launcher's InspectionSetup, if any."""
        return cls(
            inspection=inspection.rules if inspection is not None else None,
            ca=(inspection.ca_key, inspection.ca_cert) if inspection is not None else None,
            private_dir=inspection.private_dir if inspection is not None else None,
            credentials=inspection.credentials if inspection is not None else (),
            client_uids=frozenset({launcher_uid}),
            audit_caps=auditcaps.from_config(plan.audit_bounds),
            allow_hosts=tuple(plan.allow_hosts),
            allow_tcp=tuple(plan.allow_tcp),
            policy_path=plan.policy_path,
            audit_path=audit_path,
            key_path=key_path,
            monitor=plan.monitor,
        )


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for _fam, _t, _p, _c, sa in infos:
        if str(sa[0]) not in out:
            out.append(str(sa[0]))
    return out


# The label an allowed tunnel to a declared opaque destination carries in the audit.
OPAQUE_TCP = "opaque_tcp"


@record(frozen=False)
class _Verdict:
    allowed: bool
    reason: str = ""
    detail: str = ""
    status: int = 403
    addrs: tuple[str, ...] = ()
    host: CanonHost | None = None
    port: int = 0
    monitored: str = ""  # deny reason let through in monitor mode


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Sidecar:
    def __init__(self, config: SidecarConfig, policy: Policy | None = None) -> None:
        """`policy`: already loaded from the config (the synchronous launcher loads it before
        the services process starts); loaded here otherwise."""
        self.config = config
        self.limits = config.limits
        self.policy = policy or Policy.load(config.allow_hosts + config.allow_tcp, config.policy_path)  # PolicyError
        self._opaque = frozenset((p.host, p.port) for p in map(parse_pattern, config.allow_tcp))
        self.audit = AuditWriter(config.audit_path, key_path=config.key_path, caps=config.audit_caps,
                                 free_space=config.audit_free_space)  # AuditError
        self._resolve = config.resolver or system_resolver
        self._server: asyncio.base_events.Server | None = None
        self._agent_servers: list[asyncio.base_events.Server] = []  # planted proxies served directly
        self._tasks: set[asyncio.Task] = set()
        self._active = 0
        self._per_client: dict[str, int] = {}  # open connections per client key
        self._buckets: dict[str, _Bucket] = {}  # request rate per client key (standalone sidecar)
        self.endpoint: str | None = None
        self.dns_dropped = 0
        self._unix_path: str | None = None
        self.refused_clients = 0  # connections from uids not in config.client_uids
        self._peer_uids: Any = None  # services.peers.PeerUids, for a TCP listener that checks uids
        self.broker = Broker(config.credentials)
        self.inspection = config.inspection
        self.inspector: Any = None  # services.inspected.Inspector, made when a destination is inspected
        if self.inspection is not None and self.inspection.active:
            self.inspector = self._make_inspector()

    def _make_inspector(self) -> Any:
        from .tlsctx import load_ssl  # noqa: PLC0415 - TLS only when something is inspected

        load_ssl()  # the launcher kept `ssl` out; this (forked) services process lets it in
        from .inspected import Inspector  # noqa: PLC0415 - TLS only when something is inspected
        from .leafcerts import LeafMint  # noqa: PLC0415 - TLS only when something is inspected
        from .tlsterm import upstream_context  # noqa: PLC0415 - TLS only when something is inspected

        if self.config.ca is None or self.config.private_dir is None:
            raise SidecarError("inspection needs firma's CA and a private directory; this is a bug")
        mint = LeafMint(self.config.ca[0], self.config.ca[1], self.config.private_dir)
        return Inspector(self, mint, upstream_context(), self.broker)

    def inspects(self, host: CanonHost) -> str | None:
        """Why a TLS connection to `host` is terminated (DESIGN §5.7), None when it is tunnelled."""
        if self.inspector is None or host.is_ip or self.inspection is None:
            return None
        return self.inspection.why(host.host)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, listen: str = "tcp://127.0.0.1:0", tls: Any = None) -> str:
        """Listen at `listen`; `tls` (a server SSLContext requiring client certificates) makes
        every client authenticate before a byte of HTTP is read."""
        kind, addr = parse_endpoint(listen, listen=True)
        if self.config.client_uids is not None and kind == "tcp":
            from .peers import PeerUids  # noqa: PLC0415 - only a TCP listener that checks its clients' uids

            self._peer_uids = PeerUids(os.geteuid())
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._peer_uids.warm)
            except Exception as exc:  # noqa: BLE001 - without attribution every local user would be served
                raise SidecarError(
                    f"cannot attribute loopback clients to users (sock_diag: {exc}); listen on a unix:// socket "
                    "or load the inet_diag/tcp_diag modules"
                ) from None
        if isinstance(addr, str):  # unix
            return await self.serve_unix_socket(bind_unix_listener(addr), addr)
        host, port = addr
        try:
            self._server = await asyncio.start_server(self._client, host, port, limit=netio.STREAM_LIMIT,
                                                      backlog=LISTEN_BACKLOG, ssl=tls)
        except OSError as exc:
            raise SidecarError(f"cannot listen on {listen}: {exc.strerror}; choose another --listen address") from None
        sa = self._server.sockets[0].getsockname()
        self.endpoint = f"tcp://[{sa[0]}]:{sa[1]}" if ":" in sa[0] else f"tcp://{sa[0]}:{sa[1]}"
        return self.endpoint

    async def serve_unix_socket(self, sock: socket.socket, path: str) -> str:
        """Serve a listening unix socket bound at path (removed again by `aclose`)."""
        self._unix_path = path
        self._server = await asyncio.start_unix_server(
            self._client, sock=sock, limit=netio.STREAM_LIMIT, backlog=LISTEN_BACKLOG
        )
        self.endpoint = f"unix://{path}"
        return self.endpoint

    async def serve_agent_sockets(self, socks: list[socket.socket], ctx: Attribution) -> None:
        """Listeners planted in one sandbox (its proxy), served here directly, with that sandbox's
        attribution: no bridge and no second socket hop (DESIGN §5.4). Attribution headers the
        agent sends are ignored (and never forwarded upstream, as always)."""
        for sock in socks:
            sock.setblocking(False)
            server = await asyncio.start_server(lambda r, w: self._client(r, w, ctx), sock=sock,
                                                limit=netio.STREAM_LIMIT, backlog=LISTEN_BACKLOG)
            self._agent_servers.append(server)

    async def aclose(self) -> None:
        for srv in self._agent_servers:
            srv.close()
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None
        if self._peer_uids is not None:
            self._peer_uids.close()
            self._peer_uids = None
        await self.audit.aclose()

    def dns_reporter(self, sandbox_id: str, session_id: str) -> Callable[..., None]:
        bucket = _Bucket(self.limits.dns_events_per_sec, self.limits.dns_burst)

        def report(qname: str, qtype: int, answered: bool = False) -> None:
            if not bucket.take():
                self.dns_dropped += 1
                return
            self.audit.submit(
                session_id=session_id,
                sandbox_id=sandbox_id,
                action="dns.query",
                resource=f"{qname[:255]} {DNS_TYPES.get(qtype, str(qtype))}",
                # answered: with a synthetic address; the connection to it is decided on its own
                decision=auditfmt.ALLOW if answered else auditfmt.DENY,
                deny_reason="" if answered else "dns_refused",
                bundle_version=self.policy.version,
            )

        return report

    # -- audit --------------------------------------------------------------------------------
    def audit_event(self, ctx: Attribution, *, action: str, resource: str, decision: int, reason: str = "", t0: int = 0, **extra) -> None:
        self.audit.submit(
            session_id=ctx.session_id,
            agent_id=ctx.agent_id,
            sandbox_id=ctx.sandbox_id,
            action=action,
            resource=resource,
            decision=decision,
            deny_reason=reason,
            enforcement_latency_us=(time.perf_counter_ns() - t0) // 1000 if t0 else 0,
            bundle_version=self.policy.version,
            **extra,
        )

    # -- decision -----------------------------------------------------------------------------
    async def authorize(self, action: str, authority_host: CanonHost, port: int, method: str, path: str, agent_id: str,
                        context: Mapping[str, Any] | None = None, *, resolve: bool = True,
                        connect_if_requests: bool = False) -> _Verdict:
        """Name decision, then resolution and address checks. Never resolves a denied name.
        `context`: Cedar's request context (policy.request_context). `resolve=False`: the decision
        only (an inspected connection's upstream is open already). `connect_if_requests`: an
        inspected connection is accepted when some request on it could be allowed (each one is
        decided on its own), unless a rule forbids the connection itself."""
        host = authority_host.host
        try:
            await self.audit.ready()  # the signing key, loaded on the first request
            audit_ok = not self.audit.failed
        except Exception:  # noqa: BLE001 - no key (or a closed log): refused just below
            audit_ok = False
        if not audit_ok:
            # No unaudited egress: once the log cannot be written, nothing more goes out.
            return _Verdict(False, "audit_unavailable", "the audit log cannot be written; traffic refused", 503, host=authority_host, port=port)
        if self.audit.disk_low():
            # Refused now, while the refusal can still be audited, rather than failing once the disk is full.
            return _Verdict(False, "audit_disk_low", f"less than {self.audit.caps.min_free_bytes >> 20} MiB free for "
                            "the audit log; traffic refused until space is freed", 503, host=authority_host, port=port)
        if authority_host.is_ip and synthetic.is_synthetic(host):
            # A synthetic address stands for a name inside one sandbox; it is never dialled, not
            # even when an exact rule names it (DESIGN §5.4).
            return _Verdict(False, "synthetic_address", f"{host} is a synthetic address firma hands out inside a sandbox",
                            403, host=authority_host, port=port)
        d = self.policy.decide(Request(action, host, port, method, path, agent_id, context or {}))
        if connect_if_requests and not d.allowed and d.reason == "host_not_allowed" and \
                self.policy.could_allow(host, (port,), agent_id):
            return _Verdict(True, "", "decided request by request (inspected)", 200, (), authority_host, port)
        monitored = ""
        if not d.allowed:
            if not self.config.monitor:
                return _Verdict(False, d.reason, d.detail, 403, host=authority_host, port=port)
            monitored = d.reason
        if not resolve:
            return _Verdict(True, "", d.detail, 200, (), authority_host, port, monitored)
        if authority_host.is_ip:
            addrs = [host]
        else:
            try:
                addrs = await asyncio.wait_for(self._resolve(host, port), self.config.connect_timeout)
            except Exception as exc:  # noqa: BLE001 - any resolver failure refuses (fail closed)
                return _Verdict(False, "resolve_failed", f"cannot resolve {host}: {exc}", 502, host=authority_host, port=port, monitored=monitored)
            if not addrs:
                return _Verdict(False, "resolve_failed", f"no addresses for {host}", 502, host=authority_host, port=port, monitored=monitored)
        checked: list[str] = []
        exact = d.exact or self.policy.is_exact(host, port)
        for a in addrs:
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                return _Verdict(False, "resolve_failed", f"resolver returned a non-address {a!r}", 502, host=authority_host, port=port)
            cls = addrclass.forbidden_class(ip)
            if cls and not exact:
                if not self.config.monitor:
                    return _Verdict(False, "blocked_address", f"{host} resolves to {ip} ({cls})", 403, (str(ip),),
                                    host=authority_host, port=port)
                monitored = monitored or "blocked_address"
            checked.append(str(ip))
        return _Verdict(True, "", d.detail, 200, tuple(checked), authority_host, port, monitored)

    async def _dial(self, v: _Verdict) -> netio.Stream:
        last: Exception | None = None
        for ip in v.addrs:  # exactly the addresses that were checked, in order
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(ip, v.port, limit=netio.STREAM_LIMIT), self.config.connect_timeout
                )
                netio.nodelay(w)
                return netio.Stream(r, w)
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
        raise OSError(f"cannot connect to {v.host.authority(v.port) if v.host else '?'}: {last or 'no address'}")

    # -- connections --------------------------------------------------------------------------
    async def _client_uid(self, writer: asyncio.StreamWriter) -> int | None:
        """The uid of the process behind a connection: SO_PEERCRED on a unix socket, sock_diag on
        loopback TCP (services.peers). None when it cannot be told."""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return uid
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if self._peer_uids is None or not peer:
            return None
        return await self._peer_uids.uid_of(socket.IPPROTO_TCP, peer, local)

    def _rate_ok(self, key: str) -> bool:
        rate = self.limits.requests_per_client_per_sec
        if rate is None:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(rate, max(1, int(rate * 2)))
        return bucket.take()

    def _client_key(self, writer: asyncio.StreamWriter, uid: int | None) -> str:
        """Who a connection counts against: its uid, its TLS certificate's subject, or its address."""
        if uid is not None:
            return f"uid:{uid}"
        cert = writer.get_extra_info("peercert")
        if cert:
            return f"cert:{cert.get('subject')}"
        peer = writer.get_extra_info("peername")
        return f"addr:{peer[0] if isinstance(peer, tuple) else peer}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trusted: Attribution | None = None) -> None:
        """One client connection. `trusted`: the attribution of the sandbox whose planted proxy
        this is (served directly); otherwise it is read off the bridge's attribution headers."""
        uid = None
        if trusted is None and self.config.client_uids is not None:
            uid = await self._client_uid(writer)
            if uid not in self.config.client_uids:
                # Counted, not audited line by line: a stranger must not be able to fill the audit.
                self.refused_clients += 1
                writer.transport.abort()
                return
        key = "sandbox" if trusted is not None else self._client_key(writer, uid)
        task = asyncio.current_task()
        assert task is not None  # a client callback runs in its own task
        self._tasks.add(task)
        self._active += 1
        self._per_client[key] = self._per_client.get(key, 0) + 1
        netio.nodelay(writer)
        s = netio.Stream(reader, writer)
        ctx = trusted or Attribution()
        try:
            cap = self.limits.max_connections_per_client
            if cap is not None and self._per_client[key] > cap:
                # audited like any event: the audit's caps aggregate a flood of these
                writer.write(deny_response(503, "too_many_client_connections", "this client's connection limit reached"))
                self.audit_event(ctx, action=HTTP_REQUEST, resource="", decision=auditfmt.DENY, reason="too_many_client_connections")
                await writer.drain()
                return
            if self._active > self.limits.max_connections:
                writer.write(deny_response(503, "too_many_connections", "sidecar connection limit reached"))
                self.audit_event(ctx, action=HTTP_REQUEST, resource="", decision=auditfmt.DENY, reason="too_many_connections")
                await writer.drain()
                return
            first = True
            while True:
                try:
                    raw = await asyncio.wait_for(
                        s.read_head(self.limits.max_head_bytes, request=True),
                        self.limits.setup_timeout if first else self.limits.idle_timeout,
                    )
                except HttpError as exc:
                    self.malformed(ctx, s, exc.reason, exc.detail)
                    return
                except asyncio.TimeoutError:
                    if s.buf:  # slowloris: a head that never completes
                        self.malformed(ctx, s, "head_timeout", "request head not completed in time", status=408)
                    return
                except asyncio.IncompleteReadError:
                    self.malformed(ctx, s, "malformed_request", "connection closed inside a request head")
                    return
                if raw is None:
                    return
                first = False
                t0 = time.perf_counter_ns()
                try:
                    head = http1.parse_request_head(raw)
                except HttpError as exc:
                    self.malformed(ctx, s, exc.reason, exc.detail)
                    return
                ctx = trusted if trusted is not None else self._context(head)
                if not self._rate_ok(key):
                    self._deny(ctx, s, HTTP_REQUEST, "", "too_many_requests", "this client's request rate limit reached", 429, t0)
                    return
                if head.method == REPORT_METHOD:
                    # the bridge's report of a malformed head; from an agent, just a bad method
                    reason = "malformed_request" if trusted is not None else (head.get(REPORT_REASON) or "malformed_request")[:64]
                    self.malformed(ctx, s, reason, "malformed request rejected by the bridge")
                    return
                if head.method == "GET" and head.target == HEALTH_PATH:
                    body = b'{"ready":true}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                if head.method == "CONNECT":
                    await self._connect(ctx, s, head, t0)
                    return
                if not await self._http(ctx, s, head, t0):
                    return
        except (OSError, asyncio.CancelledError, ConnectionError):
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must close the connection, audited, never open it
            self.audit_event(ctx, action="sidecar.error", resource="", decision=auditfmt.ABORT, reason=f"internal_error: {type(exc).__name__}")
        finally:
            self._active -= 1
            left = self._per_client.get(key, 1) - 1
            if left:
                self._per_client[key] = left
            else:
                self._per_client.pop(key, None)
            self._tasks.discard(task)
            try:
                await s.linger_close()
            except asyncio.CancelledError:
                s.close()

    @staticmethod
    def _context(head: http1.RequestHead) -> Attribution:
        return attribution_of(head.get)

    def malformed(self, ctx: Attribution, s: netio.Stream, reason: str, detail: str, status: int = 400) -> None:
        self.audit_event(ctx, action="http.malformed", resource="", decision=auditfmt.DENY, reason=reason)
        try:
            s.w.write(deny_response(status, reason, detail))
        except (OSError, RuntimeError):
            pass

    @staticmethod
    def audited_reason(v: _Verdict) -> str:
        """A blocked address is recorded with the address the name resolved to."""
        return f"{v.reason}:{','.join(v.addrs)}" if v.reason == "blocked_address" and v.addrs else v.reason

    def _deny(self, ctx: Attribution, s: netio.Stream, action: str, resource: str, reason: str, detail: str, status: int, t0: int, decision: int = auditfmt.DENY, addrs: tuple[str, ...] = ()) -> None:
        # A blocked address is recorded with the address the name resolved to (the reason code
        # first, as monitor mode's `monitor_mode:<code>`): the audit says what was refused.
        audited = f"{reason}:{','.join(addrs)}" if reason == "blocked_address" and addrs else reason
        self.audit_event(ctx, action=action, resource=resource, decision=decision, reason=audited, t0=t0)
        try:
            s.w.write(deny_response(status, reason, detail))
        except (OSError, RuntimeError):
            pass

    # -- plain HTTP ---------------------------------------------------------------------------
    async def _http(self, ctx: Attribution, s: netio.Stream, head: http1.RequestHead, t0: int) -> bool:
        """Serve one absolute-form request; True when the client connection may carry another."""
        try:
            target = http1.split_target(head)
        except HttpError as exc:
            self._deny(ctx, s, HTTP_REQUEST, "", exc.reason, exc.detail, 403 if exc.reason != "malformed_request" else 400, t0)
            return False
        path_noq = http1.strip_query(target.path)
        try:
            host, port = split_authority(target.authority, 80)
        except HostError as exc:
            self._deny(ctx, s, HTTP_REQUEST, "", "invalid_host", str(exc), 403, t0)
            return False
        shown = host.authority(port) if port != 80 else (f"[{host.host}]" if host.kind == "ipv6" else host.host)
        resource = auditfmt.request_resource(head.method, f"http://{shown}{path_noq}")
        hosts = head.get_all("host")
        if len(hosts) > 1:
            self._deny(ctx, s, HTTP_REQUEST, resource, "duplicate_host", "more than one Host header", 403, t0)
            return False
        if hosts:
            try:
                hh, hp = split_authority(hosts[0], 80)
            except HostError:
                hh, hp = None, 0
            if hh != host or hp != port:
                self._deny(ctx, s, HTTP_REQUEST, resource, "host_mismatch", "Host header does not match the request target", 403, t0)
                return False
        try:
            framing = http1.request_framing(head)
        except HttpError as exc:
            self._deny(ctx, s, "http.malformed", resource, exc.reason, exc.detail, 400, t0)
            return False
        if framing.kind == "length" and framing.length > self.limits.max_body_bytes:
            self._deny(ctx, s, HTTP_REQUEST, resource, "body_too_large", f"body exceeds {self.limits.max_body_bytes} bytes", 413, t0)
            return False
        if self.policy.has_path_rules and urlpath.ambiguous(path_noq):
            self._deny(ctx, s, HTTP_REQUEST, resource, "ambiguous_path",
                       "the path has dot segments or doubled slashes, which servers resolve differently", 403, t0)
            return False
        stray = self.broker.stray(host.host, port, target=target.path, headers=head.headers)
        if stray:
            self._deny(ctx, s, HTTP_REQUEST, resource, f"{EXFILTRATION}:{stray}",
                       f"the placeholder of credential {stray} may not go here", 403, t0)
            return False
        held, why = await bodies.hold(s, framing, idle=self.limits.idle_timeout, needles=self.broker.needles(),
                                      expects_continue=http1.expects_continue(head))
        if why:
            exfil = why.startswith(EXFILTRATION)
            self._deny(ctx, s, HTTP_REQUEST, resource, why, "a credential's placeholder may not go here" if exfil
                       else "the agent closed before the end of the body", 403 if exfil else 400, t0)
            return False
        context = request_context(
            inspected=False, scheme="http", query_params=urlpath.query_names(target.path),
            content_type=(head.get("content-type") or "")[:256],
            content_length=framing.length if framing.kind == "length" else -1)
        # Decided on the path's normal form; forwarded as sent (a rewrite would break signed requests).
        v = await self.authorize(HTTP_REQUEST, host, port, head.method, urlpath.normalize(path_noq), ctx.agent_id, context)
        if not v.allowed:
            self._deny(ctx, s, HTTP_REQUEST, resource, v.reason, v.detail, v.status, t0, auditfmt.ABORT if v.status in (502, 504) else auditfmt.DENY, v.addrs)
            return False
        deny_reason = f"monitor_mode:{v.monitored}" if v.monitored else ""
        enforce_us = (time.perf_counter_ns() - t0) // 1000
        t_dispatch = time.perf_counter_ns()
        try:
            up = await self._dial(v)
        except OSError as exc:
            self.audit_event(ctx, action=HTTP_REQUEST, resource=resource, decision=auditfmt.ABORT, reason="upstream_unreachable", t0=t0)
            s.w.write(deny_response(502, "upstream_unreachable", str(exc)))
            return False
        status, size, keep, abort = 0, 0, False, "shutdown"
        try:
            status, size, keep, abort = await self._exchange(s, up, head, target.path, host, port, framing, held)
        except (OSError, ConnectionError) as exc:
            abort = f"relay_failed: {type(exc).__name__}"
        except HttpError as exc:
            abort = exc.reason
        finally:
            up.close()
            self._exchange_event(ctx, resource, head.method, abort, deny_reason, enforce_us, t_dispatch, status, size)
        if abort.startswith(EXFILTRATION):
            s.w.write(deny_response(403, abort, "a credential's placeholder may not go here"))
            return False
        return keep and not abort

    def _exchange_event(self, ctx, resource, method, abort, deny_reason, enforce_us, t_dispatch, status, size) -> None:
        self.audit.submit(
            session_id=ctx.session_id, agent_id=ctx.agent_id, sandbox_id=ctx.sandbox_id, action=HTTP_REQUEST,
            resource=resource,
            decision=auditfmt.DENY if abort.startswith(EXFILTRATION) else auditfmt.ABORT if abort else auditfmt.ALLOW,
            deny_reason=abort or deny_reason, enforcement_latency_us=enforce_us, bundle_version=self.policy.version,
            context_hash=auditfmt.context_hash(method, resource), dispatch_status=status,
            dispatch_latency_us=(time.perf_counter_ns() - t_dispatch) // 1000, response_size=size,
        )

    async def _exchange(self, s, up, head, path, host: CanonHost, port: int, framing, held: bytes | None) -> tuple[int, int, bool, str]:
        connection_tokens = {t.strip().lower() for v in head.get_all("connection") for t in v.split(",")}
        drop = set(ATTRIBUTION_HEADERS) | HOP_BY_HOP | connection_tokens | {"host"}
        drop |= {k.lower() for k, _ in head.headers if k.lower().startswith(HEADER_PREFIX)}  # none of ours goes upstream
        authority = host.authority(port) if port != 80 else (f"[{host.host}]" if host.kind == "ipv6" else host.host)
        out = http1.RequestHead(head.method, path, "HTTP/1.1", head.headers).without(drop).with_added([("Host", authority), ("Connection", "close")])
        # Host first, as clients send it.
        out = http1.RequestHead(out.method, out.target, out.version, (out.headers[-2],) + out.headers[:-2] + (out.headers[-1],))
        client_keep = head.version == "HTTP/1.1" and "close" not in connection_tokens
        if framing.kind == "none" or held is not None:
            # Nothing left to stream from the agent: head (and the held, scanned body) in one write,
            # and no task of its own (most requests; a task per request cost loop turns).
            up.w.write(out.to_bytes() + (held or b""))
            try:
                status, size, resp_keep = await self._relay_response(s, up, head.method, client_keep)
            except HttpError as exc:
                return 0, 0, False, exc.reason
            return status, size, client_keep and resp_keep, ""
        up.w.write(out.to_bytes())
        body_task = asyncio.ensure_future(bodies.send_request_body(
            s, up, framing, max_body=self.limits.max_body_bytes, idle=self.limits.idle_timeout,
            needles=self.broker.needles(), held=held))
        try:
            status, size, resp_keep = await self._relay_response(s, up, head.method, client_keep)
        except (OSError, ConnectionError, HttpError, asyncio.TimeoutError) as exc:
            # A body we refused to forward explains why the upstream went away: report that.
            if body_task.done() and not body_task.cancelled() and body_task.exception() is None and body_task.result():
                return 0, 0, False, body_task.result()
            body_task.cancel()
            if isinstance(exc, HttpError):
                return 0, 0, False, exc.reason
            raise
        except BaseException:
            body_task.cancel()
            raise
        body_err = ""
        if body_task.done():
            body_err = body_task.result()
        else:
            # The upstream answered before taking the whole body: the client stream is out of sync.
            body_task.cancel()
            client_keep = False
        return status, size, client_keep and resp_keep and not body_err, body_err

    async def _relay_response(self, s: netio.Stream, up: netio.Stream, method: str, client_keep: bool) -> tuple[int, int, bool]:
        while True:
            raw = await asyncio.wait_for(up.read_head(self.limits.max_head_bytes), self.limits.idle_timeout)
            if raw is None:
                raise ConnectionError("upstream closed without a response")
            resp = http1.parse_response_head(raw)
            if 100 <= resp.status < 200:
                if resp.status == 101:
                    raise ConnectionError("upstream switched protocols unasked")
                s.w.write(raw)  # 100 Continue and friends pass through
                continue
            break
        framing = http1.response_framing(resp, method)
        keep = framing.kind != "close"
        drop = {"connection", "keep-alive", "proxy-connection"}
        if resp.get_all("transfer-encoding"):
            drop.add("content-length")  # never hand the client two framings to choose from
        out = resp.without(drop)
        out = http1.ResponseHead("HTTP/1.1", out.status, out.reason, out.headers)
        if not keep or not client_keep:
            out = out.with_added([("Connection", "close")])
        s.w.write(out.to_bytes())
        size = 0
        if framing.kind == "length":
            # The upstream connection is per request (Connection: close), so it may be taken over.
            await netio.forward_counted(up, s.w, framing.length, self.limits.idle_timeout)
            size = framing.length
        elif framing.kind == "chunked":
            scanner = http1.ChunkedScanner()
            while not scanner.done:
                data = await asyncio.wait_for(up.read_some(), self.limits.idle_timeout)
                if not data:
                    raise ConnectionError("upstream closed mid-body")
                n = scanner.feed(data)
                s.w.write(data[:n])
                await s.w.drain()
            size = scanner.body_bytes
        elif framing.kind == "close":
            while True:
                data = await asyncio.wait_for(up.read_some(), self.limits.idle_timeout)
                if not data:
                    break
                size += len(data)
                s.w.write(data)
                await s.w.drain()
        await s.w.drain()
        return resp.status, size, keep

    # -- CONNECT ------------------------------------------------------------------------------
    async def _connect(self, ctx: Attribution, s: netio.Stream, head: http1.RequestHead, t0: int) -> None:
        try:
            host, port = split_authority(head.target, None)
        except HostError as exc:
            self._deny(ctx, s, NETWORK_CONNECT, "", "invalid_host", str(exc), 403, t0)
            return
        resource = host.authority(port)
        stray = self.broker.stray(host.host, port, target="", headers=())  # a placeholder as a DNS label
        if stray:
            self._deny(ctx, s, NETWORK_CONNECT, resource, f"{EXFILTRATION}:{stray}",
                       f"the placeholder of credential {stray} may not go here", 403, t0)
            return
        inspected = self.inspects(host) is not None and (host.host, port) not in self._opaque
        v = await self.authorize(NETWORK_CONNECT, host, port, "CONNECT", "", ctx.agent_id,
                                 resolve=not inspected, connect_if_requests=inspected)
        if not v.allowed:
            self._deny(ctx, s, NETWORK_CONNECT, resource, v.reason, v.detail, v.status, t0, auditfmt.ABORT if v.status in (502, 504) else auditfmt.DENY, v.addrs)
            return
        s.w.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await s.w.drain()
        if inspected:
            await self._inspected(ctx, s, host, port, t0)
            return
        await self._tunnel(ctx, s, host, port, v, t0)

    async def _inspected(self, ctx: Attribution, s: netio.Stream, host: CanonHost, port: int, t0: int) -> None:
        """A TLS connection to an inspected name: the SNI rules first, as for a tunnel."""
        verdict = await self._check_hello(s, host, port)
        if verdict:
            self.audit_event(ctx, action=NETWORK_CONNECT, resource=host.authority(port), decision=auditfmt.DENY,
                             reason=verdict, t0=t0)
            return
        await self.inspector.serve(ctx, s, host, port)

    async def transparent(self, ctx: Attribution, s: netio.Stream, host: CanonHost, port: int) -> None:
        """A connection a planted transparent listener accepted (DESIGN §5.4): `host` is the name
        the synthetic address it dialled stands for, or the IP literal it dialled. To a name it
        must carry TLS whose SNI is that name, or plain HTTP whose every request's Host names it
        (decided request by request); anything else needs `allow_tcp` (opaque). An IP literal is
        decided as one, as a CONNECT to it is. Refusals close the connection and are audited."""
        t0 = time.perf_counter_ns()
        resource = host.authority(port)
        stray = self.broker.stray(host.host, port, target="", headers=())  # a placeholder as a DNS label
        if stray:
            self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY,
                             reason=f"{EXFILTRATION}:{stray}", t0=t0)
            return
        opaque = (host.host, port) in self._opaque
        if not opaque and not host.is_ip:
            kind = await self._classify(s)
            if kind == "http":
                await self._requests_in_tunnel(ctx, s, host, port, t0)
                return
            if kind != "tls":
                if kind != "closed":
                    self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY,
                                reason="tls_or_http_required", t0=t0)
                return
        inspected = not opaque and self.inspects(host) is not None
        v = await self.authorize(NETWORK_CONNECT, host, port, "CONNECT", "", ctx.agent_id,
                                 resolve=not inspected, connect_if_requests=inspected)
        if not v.allowed:
            reason = f"{v.reason}:{','.join(v.addrs)}" if v.reason == "blocked_address" and v.addrs else v.reason
            self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource,
                        decision=auditfmt.ABORT if v.status in (502, 504) else auditfmt.DENY, reason=reason, t0=t0)
            return
        if inspected:
            await self._inspected(ctx, s, host, port, t0)
            return
        await self._tunnel(ctx, s, host, port, v, t0)

    def inbound_reporter(self, ctx: Attribution) -> Callable[[str, int, str, int], None]:
        """--publish: each inbound connection to the agent's published port, as `network.inbound`."""
        def report(resource: str, decision: int, reason: str, size: int) -> None:
            self.audit_event(ctx, action="network.inbound", resource=resource, decision=decision, reason=reason,
                        response_size=size)
        return report

    def refuse_transparent(self, ctx: Attribution, resource: str, reason: str) -> None:
        """A transparent connection refused before any decision (an unknown synthetic address)."""
        self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY, reason=reason)

    async def _classify(self, s: netio.Stream) -> str:
        """What a transparent connection to a name carries, from its first bytes: "tls", "http"
        (an upper-case method token and a space), "other", or "closed" (nothing within the setup
        time)."""
        deadline = time.monotonic() + self.limits.setup_timeout
        while True:
            if s.buf[:1] == b"\x16":
                return "tls"
            token = bytes(s.buf[:17]).split(b" ", 1)
            if s.buf and not (token[0].isalpha() and token[0].isupper()) or len(token[0]) > 16:
                return "other"
            if len(token) == 2 and token[0]:
                return "http"
            left = deadline - time.monotonic()
            if left <= 0:
                return "other" if s.buf else "closed"
            try:
                chunk = await asyncio.wait_for(s.r.read(65536), left)
            except asyncio.TimeoutError:
                continue
            if not chunk:
                return "other" if s.buf else "closed"
            s.buf += chunk

    async def _tunnel(self, ctx: Attribution, s: netio.Stream, host: CanonHost, port: int, v: _Verdict, t0: int) -> None:
        """An allowed tunnel (CONNECT after its 200, or a transparent connection): the SNI rules,
        then the upstream and the relay."""
        resource = host.authority(port)
        deny_reason = f"monitor_mode:{v.monitored}" if v.monitored else ""
        if host.is_ip and self.policy.has_path_rules and (host.host, port) not in self._opaque:
            # Requests in a tunnel would pass the path rules unseen (`curl -p http://IP/…`): with
            # path rules they are read and decided one by one, as proxy requests are.
            await self._requests_in_tunnel(ctx, s, host, port, t0)
            return
        # Peek the client's first bytes before dialing: a denied SNI never reaches the upstream.
        # A declared opaque destination is not peeked: it may be server-speaks-first.
        opaque = (host.host, port) in self._opaque
        verdict = "" if opaque else await self._check_hello(s, host, port)
        if opaque:
            deny_reason = deny_reason or OPAQUE_TCP
        if verdict:
            if not self.config.monitor:
                self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY, reason=verdict, t0=t0)
                return
            deny_reason = deny_reason or f"monitor_mode:{verdict}"
        enforce_us = (time.perf_counter_ns() - t0) // 1000
        t_dispatch = time.perf_counter_ns()
        try:
            up = await self._dial(v)
        except OSError:
            self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.ABORT, reason="upstream_unreachable", t0=t0)
            return
        early = s.take_buffer()
        if early:
            up.w.write(early)
        act = netio.Activity()
        act.up = len(early)
        why = "shutdown"
        try:
            why = await netio.relay(s, up, self.limits.idle_timeout, self.limits.max_tunnel_secs, act)
        finally:
            self._tunnel_event(ctx, resource, deny_reason, why, enforce_us, t_dispatch, act)

    async def _requests_in_tunnel(self, ctx: Attribution, s: netio.Stream, host: CanonHost, port: int, t0: int) -> None:
        """A tunnel to an address under a policy with path rules: each plain HTTP request in it is
        decided like a proxy request to that address (its path normalised, its Host checked);
        TLS cannot be seen into, so it is refused until inspection exists."""
        resource = host.authority(port)
        if not s.buf:  # a transparent connection was already read into (its first bytes classified it)
            try:
                first = await asyncio.wait_for(s.r.read(65536), self.limits.setup_timeout)
            except asyncio.TimeoutError:
                first = b""
            s.buf += first
        if s.buf[:1] == b"\x16":
            self.audit_event(ctx, action=NETWORK_CONNECT, resource=resource, decision=auditfmt.DENY,
                        reason="tls_needs_inspection", t0=t0)
            return
        if not s.buf:
            return  # nothing was sent
        while True:
            try:
                raw = await asyncio.wait_for(s.read_head(self.limits.max_head_bytes, request=True), self.limits.idle_timeout)
            except (HttpError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                self.audit_event(ctx, action="http.malformed", resource=resource, decision=auditfmt.DENY,
                            reason="malformed_request", t0=t0)
                return
            if raw is None:
                return
            try:
                head = http1.parse_request_head(raw)
            except HttpError as exc:
                self.malformed(ctx, s, exc.reason, exc.detail)
                return
            if not head.target.startswith("/") or head.method == "CONNECT":
                self._deny(ctx, s, HTTP_REQUEST, resource, "malformed_request", "a tunnel carries origin-form requests", 400, t0)
                return
            absolute = http1.RequestHead(head.method, f"http://{resource}{head.target}", head.version, head.headers)
            if not await self._http(ctx, s, absolute, time.perf_counter_ns()):
                return

    def _tunnel_event(self, ctx, resource, deny_reason, why, enforce_us, t_dispatch, act) -> None:
        self.audit.submit(
            session_id=ctx.session_id, agent_id=ctx.agent_id, sandbox_id=ctx.sandbox_id, action=NETWORK_CONNECT,
            resource=resource, decision=auditfmt.ALLOW, deny_reason=deny_reason or ("" if why == "closed" else why),
            enforcement_latency_us=enforce_us, bundle_version=self.policy.version,
            context_hash=auditfmt.context_hash("CONNECT", resource), dispatch_status=200,
            dispatch_latency_us=(time.perf_counter_ns() - t_dispatch) // 1000, response_size=act.down,
        )

    async def _check_hello(self, s: netio.Stream, host: CanonHost, port: int) -> str:
        """'' when the tunnel may open, else the deny reason: the SNI rules of DESIGN §9. A tunnel
        to a hostname must carry TLS whose SNI is that name, on every port: anything else could
        be plain HTTP whose `Host:` names another site behind the same address (domain fronting),
        and no timing window or parser leniency may decide that. Other protocols to a hostname
        need `allow_tcp` (opaque, see `_connect`). A tunnel to an IP literal names its address
        itself and may carry anything."""
        must_tls = not host.is_ip
        wait = self.limits.setup_timeout if must_tls else 0.25  # IP literals: server-speaks-first
        deadline = time.monotonic() + wait
        while True:
            try:
                hello = tlshello.parse_client_hello(bytes(s.buf))
                break
            except tlshello.BadHello:
                return "bad_client_hello"
            except tlshello.NotTls:
                return "tls_required" if must_tls else ""
            except tlshello.NeedMore:
                pass
            left = deadline - time.monotonic()
            chunk = None
            if left > 0:
                try:
                    chunk = await asyncio.wait_for(s.r.read(65536), left)
                except asyncio.TimeoutError:
                    pass
            if chunk is None:  # the deadline: decide on what arrived
                if must_tls:
                    return "tls_required"
                # an IP literal's tunnel: nothing yet (server speaks first), or an unfinished hello
                return "tls_incomplete" if s.buf[:1] == b"\x16" else ""
            if not chunk:
                return "client_closed"
            s.buf += chunk
            if len(s.buf) > tlshello.MAX_HELLO + 4096:
                return "bad_client_hello"
        if hello.ech:
            return "ech_not_allowed"
        if hello.sni is None:
            return "" if host.is_ip else "sni_missing"
        try:
            sni = canon_host(hello.sni)
        except HostError:
            return "sni_mismatch"
        return "" if sni.host == host.host else "sni_mismatch"

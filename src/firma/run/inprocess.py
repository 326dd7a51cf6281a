"""The services hosted in asyncio in this process, for HOST_LOOPBACK routing (vz, runner): the
steps of firma.run.sequence in one event loop. The sidecar, bridge and DNS stub start on host
loopback before the sandbox is built, and their addresses go to the backend in the envelope."""

from __future__ import annotations

import asyncio
import signal
import os
import secrets
from typing import Any

from ..core.runopts import TIMEOUT_GRACE_SECS, TIMEOUT_STATUS, timeout_note
from ..backends.base import Backend, LaunchedChild, LaunchHooks, PlantedSockets, RoutingPlan
from ..core.model import Check, ExecutionEnvelope, RunPlan
from ..services.health import probe_async
from ..errors import BackendError, SidecarError
from .gates import unreachable_external
from .log import RunLog
from .record import RunRecord, sidecar_listen
from .signals import Supervisor, cancel_current_task, close_services, stop_child


class InProcessHosting:
    """The services in this process's event loop, on host loopback ephemeral ports."""

    def __init__(self, backend: Backend, log: RunLog, *, owner_only: bool = False, bridge_credential: bool = False) -> None:
        """`owner_only`: attribute every loopback connection and datagram to a uid (Linux
        sock_diag) and serve only this user's. `bridge_credential`: where no uid can be looked up
        (macOS), the bridge requires a per-run credential carried in proxy_url's userinfo."""
        try:
            from ..services import bridge, dns_stub, sidecar  # noqa: PLC0415 - the services load only for an in-process hosting
        except ImportError as exc:
            raise SidecarError(f"host services are not available in this install ({exc}); reinstall firma") from None
        self._svc_bridge, self._svc_dns, self._svc_sidecar = bridge, dns_stub, sidecar
        self._backend = backend
        self._log = log
        self._sup: Supervisor | None = None
        self._sidecar: Any = None
        self._services: list[Any] = []  # sidecar, bridge, DNS stub: closed in reverse
        self._serve_owner_only = owner_only
        self._stub: Any = None
        self._bridge_credential = bridge_credential
        self._peers: Any = None

    async def probe_external(self, plan: RunPlan) -> None:
        try:
            from ..services.tlsctx import for_sidecar  # noqa: PLC0415 - only with an external sidecar

            await probe_async(plan.sidecar.endpoint, plan.sidecar.startup_timeout_secs, for_sidecar(plan.sidecar.tls))
        except Exception as exc:  # noqa: BLE001 - any failure to answer refuses the launch
            raise unreachable_external(plan, exc) from None

    def take_signals(self) -> None:
        log = self._log
        loop = asyncio.get_running_loop()
        # Errors inside services must not print on the agent's terminal: they go to run.log.
        loop.set_exception_handler(
            lambda _loop, ctx: log(f"service error: {ctx.get('message')}: {ctx.get('exception')!r}", "error")
        )
        self._sup = Supervisor(on_early_signal=cancel_current_task())
        self._sup.install()

    def restore_signals(self) -> None:
        if self._sup is not None:
            self._sup.uninstall()

    async def ready_sidecar(self, run: RunRecord) -> None:
        # Concurrent runs share the state root; the audit key is created atomically by the
        # audit writer, so no lock is needed here.
        sc = self._svc_sidecar
        self._sidecar = sc.Sidecar(
            sc.SidecarConfig.for_run(run.plan, audit_path=run.dirs.audit_path, key_path=run.dirs.key_path,
                                    launcher_uid=os.geteuid())
        )
        self._services.append(self._sidecar)

    async def start_services(self, run: RunRecord, routing: RoutingPlan) -> tuple[str, str | None]:
        plan = run.plan
        if self._sidecar is not None:
            endpoint = await self._start_sidecar(run)
            reporter = self._sidecar.dns_reporter(plan.identity.sandbox_id, plan.identity.session_id)
        else:
            endpoint, reporter = plan.sidecar.endpoint, None
        peers = self._owner_peers(run)
        from ..services.tlsctx import for_sidecar  # noqa: PLC0415 - TLS only with an external sidecar

        tls = None if self._sidecar is not None else for_sidecar(plan.sidecar.tls)
        credential = f"firma:{secrets.token_urlsafe(24)}" if self._bridge_credential else None
        bridge = self._svc_bridge.Bridge(sidecar_endpoint=endpoint, attribution=plan.identity.attribution_headers(),
                                         peers=peers, sidecar_tls=tls, credential=credential)
        self._services.append(bridge)
        bport = await bridge.serve_address("127.0.0.1", 0)
        dns_addr = None
        if routing.dns_stub:
            # Where the stub cannot tell the agent's queries from another local user's (no peer uid:
            # macOS), it only counts them: a stranger must not be able to write the run's audit.
            stub = self._svc_dns.DnsStub(on_query=None if credential is not None else reporter, peers=peers)
            self._stub = stub
            self._services.append(stub)
            dport = await stub.serve_address("127.0.0.1", 0)
            dns_addr = f"127.0.0.1:{dport}"
        owner = f"; only uid {peers.owner_uid}'s sockets are served (sock_diag)" if peers is not None else ""
        if credential is not None:
            owner = "; the bridge requires this run's credential (proxy_url userinfo)"
        run.add_check(Check("host_services", True, f"bridge 127.0.0.1:{bport}" + (f", dns stub {dns_addr}" if dns_addr else "") + owner))
        userinfo = f"{credential}@" if credential is not None else ""
        return f"http://{userinfo}127.0.0.1:{bport}", dns_addr

    def _owner_peers(self, run: RunRecord) -> Any:
        if not self._serve_owner_only:
            return None
        from ..services.peers import PeerUids  # noqa: PLC0415 - host-loopback backends on Linux only

        peers = PeerUids(os.geteuid())
        try:
            peers.warm()
        except Exception as exc:  # noqa: BLE001 - without attribution the ports would serve anyone
            peers.close()
            raise SidecarError(
                f"cannot attribute loopback connections to users (sock_diag: {exc}); the bridge would "
                "serve every local user, so firma refuses: load the inet_diag/tcp_diag/udp_diag modules"
            ) from None
        self._peers = peers
        return peers

    async def _start_sidecar(self, run: RunRecord) -> str:
        plan = run.plan
        timeout = plan.sidecar.startup_timeout_secs
        try:
            endpoint = await asyncio.wait_for(self._sidecar.start(sidecar_listen(run)), timeout)
        except asyncio.TimeoutError:
            raise SidecarError(
                f"embedded sidecar was not ready within {timeout:g}s; refusing to start the agent; "
                "raise --sidecar-startup-timeout-secs"
            ) from None
        run.sidecar_endpoint = endpoint
        try:
            await probe_async(endpoint, timeout)
        except Exception as exc:  # noqa: BLE001 - any failure to answer refuses the launch
            run.add_check(Check("sidecar_ready", False, f"{endpoint}: {exc}"))
            raise SidecarError(f"sidecar at {endpoint} did not answer ({exc}); refusing to start the agent") from None
        run.add_check(Check("sidecar_ready", True, f"embedded sidecar answered at {endpoint}"))
        return endpoint

    async def launch(self, run: RunRecord, envelope: ExecutionEnvelope) -> LaunchedChild:
        sup = self._sup
        assert sup is not None
        hooks = LaunchHooks(serve_planted=_no_planting, add_check=run.add_check, log=run.log)
        child = await self._backend.launch(envelope, hooks)
        sup.attach(child)
        if sup.early_signal is not None:
            child.forward_signal(sup.early_signal)
        return child

    async def serve(self, run: RunRecord) -> None:
        """The services serve since start_services."""

    async def supervise(self, run: RunRecord, child: LaunchedChild) -> int:
        assert self._sup is not None
        secs = run.plan.timeout_secs
        if secs is None:
            return await self._sup.wait()
        try:
            async with asyncio.timeout(secs):
                return await self._sup.wait()
        except TimeoutError:
            pass
        run.log(f"--timeout {secs:g}s reached: SIGTERM to the agent", "warn")
        child.forward_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(TIMEOUT_GRACE_SECS):
                await self._sup.wait()
        except TimeoutError:
            run.log(f"the agent outlived --timeout's {TIMEOUT_GRACE_SECS:g}s grace: killing it", "warn")
            child.kill_tree()
            await self._sup.wait()
        run.notes.append(timeout_note(secs))
        return TIMEOUT_STATUS

    def interrupted(self, exc: BaseException) -> int | None:
        if isinstance(exc, asyncio.CancelledError) and self._sup is not None:
            return self._sup.early_signal
        return None

    async def teardown(self, run: RunRecord, child: LaunchedChild | None) -> None:
        """Reverse start order: the sandbox, then the services (the sidecar last: it flushes
        the audit log)."""
        self.restore_signals()
        if child is not None:
            await stop_child(child, run.log)
        await close_services(self._services, run.log)
        if self._stub is not None and self._bridge_credential:
            run.log(f"DNS stub answered {self._stub.answered} queries REFUSED (not attributed: no peer uid here)", "info")
        if self._peers is not None:
            if self._peers.refused:
                run.log(f"refused {self._peers.refused} connections or datagrams from other users' sockets", "warn")
            self._peers.close()


async def _no_planting(_socks: PlantedSockets) -> None:
    raise BackendError("routing", "a HOST_LOOPBACK backend planted sockets; its routing() is wrong")

"""The services hosted in a forked process, for a backend that plants its sockets in the sandbox
(bwrap, PLANTED routing): the steps of firma.run.sequence in two processes.

The launcher (this process) is synchronous and never imports asyncio. It plans, gates, makes
the embedded sidecar ready in the sense of DESIGN §9 (policy loaded, audit key checked, listener
bound), builds the sandbox and plants the proxy and DNS sockets, measures the sandbox, releases
the agent, forks the *services process* and supervises. The services process imports asyncio
and serves the sidecar, the bridge and the DNS stub on the listening sockets it inherited; the
agent's first connections wait in those sockets' backlogs until it serves them.

Why two processes: importing asyncio and the services is ~40 ms here, more than a third of a
launch; in the services process it runs alongside the agent's own start-up, and a run whose
agent never sends anything does not wait for it.

Fail closed: after the fork the launcher keeps no copy of the listeners, so if the services
process dies the agent's connections are refused, and the launcher, which watches it, stops the
agent and exits 1. Teardown stops the services with SIGTERM: before the services process has
taken over SIGTERM (it does so before serving anything) the signal ends it at once, and
nothing was served; after, it drains and flushes the audit log before it exits."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Mapping, cast

from ..core.runopts import TIMEOUT_GRACE_SECS, TIMEOUT_STATUS, timeout_note
from ..backends.base import HeldSandbox, LaunchedChild, PlantedChild, PlantedSockets, PlantingBackend, RoutingPlan
from ..core.model import PLANTED_DNS_ADDR, PLANTED_PROXY_ADDR, Check, ExecutionEnvelope, Publish, RunPlan
from ..core.record import record
from ..errors import FirmaError, LaunchError, SidecarError
from .gates import unreachable_external
from .log import RunLog
from .record import RunRecord, sidecar_listen
if TYPE_CHECKING:
    from .terminal import TerminalRelay
from .signals import (
    FORWARDED,
    TERMINATION,
    Interrupted,
    LaunchWaits,
    Signals,
    Supervisor,
    close_services,
    stop_child,
)

_STOP_TIMEOUT = 10.0  # the services drain and flush the audit log within this after SIGTERM


@record(frozen=False)
class EmbeddedSidecar:
    """The embedded sidecar made ready by the launcher, served by the services process."""

    policy: Any  # firma.core.policy.Policy
    listener: Any  # socket.socket, listening on `path`
    endpoint: str
    path: str
    inspection: Any = None  # run.inspection_setup.InspectionSetup: CA, rules, credentials (DESIGN §5.7)


@record(frozen=False)
class ServicesProcess:
    pid: int
    pidfd: int
    serving_r: int  # one byte once everything serves; EOF when the process ends
    stop_w: int  # closed by the launcher to stop the services (a signal could be lost, see _fork_services)
    serving: bool = False
    serving_eof: bool = False
    status: int | None = None  # wait status once reaped

    @property
    def starting(self) -> bool:
        """Neither serving nor ending yet: its start-up deadline applies."""
        return not (self.serving or self.serving_eof)


class ForkedHosting:
    """The services in a process forked once the agent is released (see the module docstring)."""

    def __init__(self, backend: PlantingBackend, log: RunLog, environ: Mapping[str, str]) -> None:
        self._backend = backend
        self._environ = environ  # the caller's: credential sources, SSL_CERT_FILE
        self._log = log
        self._signals: Signals | None = None
        self._waits: LaunchWaits | None = None
        self._embedded: EmbeddedSidecar | None = None
        self._held: HeldSandbox | None = None  # built, not yet released: aborted at teardown
        self._socks: PlantedSockets | None = None  # the launcher's copies until the fork
        self._services: ServicesProcess | None = None
        self._published: list[tuple[socket.socket, Publish]] = []  # --publish host listeners
        self._tty: TerminalRelay | None = None  # the agent's own terminal (DESIGN §12a)

    async def probe_external(self, plan: RunPlan) -> None:
        from ..services.health import probe  # noqa: PLC0415 - only with an external sidecar
        from ..services.tlsctx import for_sidecar  # noqa: PLC0415 - only with an external sidecar

        try:
            probe(plan.sidecar.endpoint, plan.sidecar.startup_timeout_secs, for_sidecar(plan.sidecar.tls))
        except FirmaError as exc:
            raise unreachable_external(plan, exc) from None

    def take_signals(self) -> None:
        # A termination signal is recorded and acted on at the launch's next wait, never
        # raised as KeyboardInterrupt anywhere; during teardown it is recorded and ignored.
        self._signals = Signals()
        self._signals.install()
        self._waits = LaunchWaits(self._signals)

    def restore_signals(self) -> None:
        if self._tty is not None:
            self._tty.close()  # the user's terminal as it was, on every way out
            self._tty = None
        if self._signals is not None:
            self._signals.uninstall()

    async def ready_sidecar(self, run: RunRecord) -> None:
        self._embedded = _ready_embedded(run, self._environ)

    async def start_services(self, run: RunRecord, routing: RoutingPlan) -> tuple[str, str | None]:
        # Nothing to start yet: the addresses are the planted ones, the agent's connections wait
        # in the planted listeners' backlogs until the services process serves them. --publish's
        # host listeners are bound now, so a taken port refuses the launch before the sandbox.
        for pub in run.plan.publish:
            self._published.append((_bind_published(pub), pub))
        if self._published:
            run.add_check(Check("published", True, "; ".join(
                f"agent port {p.port} at {s.getsockname()[0]}:{s.getsockname()[1]}" for s, p in self._published)))
        return "http://%s:%d" % PLANTED_PROXY_ADDR, "%s:%d" % PLANTED_DNS_ADDR

    async def launch(self, run: RunRecord, envelope: ExecutionEnvelope) -> PlantedChild:
        waits = self._waits
        assert waits is not None
        waits.check()
        if run.plan.terminal:
            from .terminal import TerminalRelay  # noqa: PLC0415 - only with a terminal

            self._tty = TerminalRelay()
        tty = self._tty
        self._held = held = self._backend.build(envelope, run.add_check, run.log, waits,
                                                terminal=tty.slave if tty else None,
                                                terminal_stderr=bool(tty and tty.stderr_too))
        self._socks = held.socks
        waits.check()
        child = self._backend.release(held, run.add_check, waits)
        self._held = None
        if tty is not None:
            tty.close_slave()  # the agent holds it; the pty ends when the agent does
            tty.raw()
            run.add_check(Check("terminal", True, "the agent runs on a pty of its own (controlling terminal, "
                                "setsid -c), relayed; the user's terminal raw while it runs, restored after"))
        return child

    async def serve(self, run: RunRecord) -> None:
        # Forked only now, so the services' start-up (~40 ms of imports) competes with the
        # agent's start-up rather than with the sandbox checks and the release.
        socks = self._socks
        assert socks is not None
        self._services = _fork_services(run, self._embedded, socks, self._published)
        # The services process now holds the only copies of the listeners (fail closed).
        socks.close()
        for sock, _pub in self._published:
            sock.close()
        if self._embedded is not None:
            self._embedded.listener.close()
        run.log(f"services process pid {self._services.pid}", "info")

    async def supervise(self, run: RunRecord, child: LaunchedChild) -> int:
        assert self._services is not None and self._signals is not None
        # A planting backend's release returns a PlantedChild (see launch above).
        status, timed_out = _supervise(cast(PlantedChild, child), self._services, self._signals, run.log,
                                       run.plan.sidecar.startup_timeout_secs, run.plan.timeout_secs, self._tty)
        if self._tty is not None:
            self._tty.drain()  # the agent's last output
            self._tty.restore()
        if timed_out:
            run.notes.append(timeout_note(run.plan.timeout_secs))
            return TIMEOUT_STATUS
        return status

    def interrupted(self, exc: BaseException) -> int | None:
        return exc.signum if isinstance(exc, Interrupted) else None

    async def teardown(self, run: RunRecord, child: LaunchedChild | None) -> None:
        """Reverse start order: the sandbox, the services (they flush the audit log), the
        copies of the sockets this process still holds."""
        if self._held is not None:
            self._backend.abort(self._held)
        if child is not None:
            await stop_child(child, run.log)
        if self._services is not None:
            _stop_services(self._services, run.log)
        if self._socks is not None:
            self._socks.close()
            self._socks.reap_factory()
        for sock, _pub in self._published:
            sock.close()
        embedded = self._embedded
        if embedded is not None:
            embedded.listener.close()
            try:
                os.unlink(embedded.path)
            except OSError:
                pass


def _ready_embedded(run: RunRecord, environ: Mapping[str, str]) -> EmbeddedSidecar:
    """DESIGN §9 readiness, measured here: the policy loads, the audit key is a private PEM file
    (made now in a new state dir), the audit log opens, the listener is bound."""
    from ..services.audit_files import load_or_create_key, open_audit_log, read_key_file  # noqa: PLC0415 - only with the embedded sidecar
    from ..core.policy import Policy  # noqa: PLC0415 - only with the embedded sidecar
    from ..services.listen import bind_unix_listener  # noqa: PLC0415 - only with the embedded sidecar

    plan = run.plan
    policy = Policy.load(plan.allow_hosts + plan.allow_tcp, plan.policy_path)
    if read_key_file(run.dirs.key_path) is None:
        load_or_create_key(run.dirs.key_path)
    os.close(open_audit_log(run.dirs.audit_path, "fix its directory"))
    inspection = None
    if plan.inspection is not None and (plan.inspection.trust or plan.inspection.credentials):
        from .inspection_setup import prepare  # noqa: PLC0415 - only with inspection or credentials

        inspection = prepare(run, policy, environ)
    endpoint = sidecar_listen(run)
    path = endpoint[len("unix://") :]
    listener = bind_unix_listener(path)
    run.sidecar_endpoint = endpoint
    run.add_check(
        Check(
            "sidecar_ready",
            True,
            f"embedded sidecar ready: policy {policy.version} loaded, audit key checked, listening at {endpoint}",
        )
    )
    return EmbeddedSidecar(policy=policy, listener=listener, endpoint=endpoint, path=path, inspection=inspection)


# --- the services process ------------------------------------------------------------------


def _bind_published(pub: Publish) -> socket.socket:
    family = socket.AF_INET6 if ":" in pub.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((pub.bind, pub.host_port))
        sock.listen(256)
    except OSError as exc:
        sock.close()
        raise LaunchError(f"--publish {pub.host_port}:{pub.port}: cannot listen on {pub.bind}:{pub.host_port}: "
                          f"{exc.strerror}; choose another host port") from None
    return sock


def _fork_services(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets,
                   published: list[tuple[socket.socket, Publish]]) -> ServicesProcess:
    serving_r, serving_w = os.pipe2(os.O_CLOEXEC)
    # The launcher stops the services by closing this pipe, then sending SIGTERM: a SIGTERM that
    # arrives before the child's start-up set its handlers is discarded with the group signals it
    # means to drop (below), so the child looks at the pipe once its handlers are set.
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    ppid = os.getpid()
    # Blocked across the fork: the child resets the launcher's handlers before any of these
    # reaches it, so a SIGTERM from the launcher is never swallowed by a copied handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        for fd in (serving_r, serving_w, stop_r, stop_w):
            os.close(fd)
        raise SidecarError(f"cannot start the services process: {exc.strerror}; check the process limits") from None
    if pid == 0:
        code = 1
        try:
            os.close(serving_r)
            os.close(stop_w)
            # A process group of its own: a signal to the launcher's group (timeout(1), a CI
            # cancel, systemd stop, ^C) must not end the services while the agent shuts down and
            # may still talk to the network; the launcher ends them at teardown.
            os.setpgid(0, 0)
            code = _services_main(run, embedded, socks, serving_w, stop_r, ppid, published)
        except BaseException as exc:  # noqa: BLE001 - the services process never returns into the launcher
            try:
                run.log(f"services process failed: {exc!r}", "error")
            except BaseException:  # noqa: BLE001 - the services process never returns into the launcher
                pass
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.close(serving_w)
    os.close(stop_r)
    try:
        os.setpgid(pid, pid)  # also here, so no group signal can reach it before the child's own call
    except OSError:
        pass  # the child did it already (EACCES after its exec-free start) or is gone
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(serving_r)
        os.close(stop_w)
        raise SidecarError(f"cannot watch the services process: {exc.strerror}") from None
    return ServicesProcess(pid=pid, pidfd=pidfd, serving_r=serving_r, stop_w=stop_w)


def _services_main(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets, serving_w: int, stop_r: int,
                   ppid: int, published: list[tuple[socket.socket, Publish]]) -> int:
    signal.set_wakeup_fd(-1)
    # A signal sent to the launcher's group between the fork and setpgid is pending here, blocked:
    # ignoring a signal discards its pending instance, so a group SIGTERM (timeout(1), a CI
    # cancel) cannot end the services that the agent's shutdown may still need.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until the services take it over (see _serve)
    for s in FORWARDED:
        if s != signal.SIGTERM:
            # ^C and hang-ups reach the launcher's whole process group: the launcher decides.
            signal.signal(s, signal.SIG_IGN if s in TERMINATION else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    if select.select([stop_r], [], [], 0)[0]:
        return 0  # stopped before it started (its SIGTERM may have been discarded above)
    _die_with_parent(ppid)
    gc.disable()  # start-up allocates only long-lived objects (see cli.entry); on again in _serve
    # The agent owns the terminal: nothing of the services goes there (errors go to run.log).
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    run.log.quiet = True
    import asyncio  # noqa: PLC0415 - the point of this process

    asyncio.run(_serve(run, embedded, socks, serving_w, stop_r, published))
    return 0


def _die_with_parent(ppid: int) -> None:
    """SIGKILL when the launcher dies, even by SIGKILL: nothing of a run outlives it."""
    import ctypes  # noqa: PLC0415 - loaded already (planting)

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != ppid:  # the launcher died before the line above
        os._exit(1)


async def _serve(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets, serving_w: int, stop_r: int,
                 published: list[tuple[socket.socket, Publish]]) -> None:
    import asyncio  # noqa: PLC0415 - the services process only: the launcher never imports asyncio

    from ..services.bridge import Bridge  # noqa: PLC0415 - the services process only
    from ..services.dns_stub import DnsStub  # noqa: PLC0415 - the services process only
    from ..core.policy import Policy  # noqa: PLC0415 - the services process only
    from ..core.wire import Attribution  # noqa: PLC0415 - the services process only
    from ..services.sidecar import Sidecar, SidecarConfig  # noqa: PLC0415 - the services process only

    plan, log = run.plan, run.log
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _loop, ctx: log(f"service error: {ctx.get('message')}: {ctx.get('exception')!r}", "error")
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # from now on SIGTERM drains, then exits
    loop.add_reader(stop_r, stop.set)  # the launcher's stop: EOF, whenever it came
    services: list[Any] = []
    sidecar = None
    try:
        if embedded is not None:
            sidecar = Sidecar(
                SidecarConfig.for_run(plan, audit_path=run.dirs.audit_path, key_path=run.dirs.key_path,
                                      launcher_uid=os.geteuid(), inspection=embedded.inspection),
                policy=embedded.policy,
            )
            services.append(sidecar)  # closed last: it flushes the audit log
            endpoint = await sidecar.serve_unix_socket(embedded.listener, embedded.path)
            reporter = sidecar.dns_reporter(plan.identity.sandbox_id, plan.identity.session_id)
        else:
            endpoint, reporter = plan.sidecar.endpoint, None
        ctx = Attribution(sandbox_id=plan.identity.sandbox_id, session_id=plan.identity.session_id,
                          agent_id=plan.identity.agent_id, profile=plan.identity.profile)
        bridge = None
        if sidecar is not None:
            # One hop: the embedded sidecar serves the planted proxy itself (DESIGN §5.4).
            await sidecar.serve_agent_sockets([socks.proxy_tcp], ctx)
        else:
            from ..services.tlsctx import for_sidecar  # noqa: PLC0415 - TLS only with an external sidecar

            bridge = Bridge(sidecar_endpoint=endpoint, attribution=plan.identity.attribution_headers(),
                            sidecar_tls=for_sidecar(plan.sidecar.tls))
            services.append(bridge)
            await bridge.serve_sockets([socks.proxy_tcp])
        # Transparent egress (DESIGN §5.4): allowed names resolve to synthetic addresses, and the
        # listeners planted on every address are decided here (embedded sidecar: one hop).
        from ..core import synthetic  # noqa: PLC0415 - the services process only
        from ..services.transparent import TransparentEgress, names_for  # noqa: PLC0415 - the services process only

        table = synthetic.SyntheticNames()
        ports = tuple(sorted({s.getsockname()[1] for s in socks.transparent}))
        names = None
        if socks.transparent:
            policy = sidecar.policy if sidecar is not None else Policy.load(plan.allow_hosts + plan.allow_tcp, None)
            names = names_for(policy, ports, plan.identity.agent_id, table, answer_all=plan.monitor)
            # the embedded sidecar decides in this process; an external one through the bridge
            via: Any = sidecar if sidecar is not None else bridge
            egress = TransparentEgress(names=table, ctx=ctx, decide=via.transparent, refuse=via.refuse_transparent)
            services.append(egress)
            await egress.serve_sockets(socks.transparent)
        stub = DnsStub(on_query=reporter, names=names)
        services.append(stub)
        if published and socks.factory is not None and sidecar is not None:
            from ..services.publish import Published  # noqa: PLC0415 - only with --publish

            pub_service = Published(socks.factory, sidecar.inbound_reporter(ctx))
            socks.factory = None  # the service owns it now
            services.append(pub_service)
            await pub_service.serve(published)
        await stub.serve_sockets(socks.dns_udp, socks.dns_tcp)
        os.write(serving_w, b"1")
        if sidecar is not None:
            sidecar.audit.load_soon()  # parsed on the audit thread while the agent starts
        # Long-lived from here: keep the start-up heap out of collections, collect again.
        gc.freeze()
        gc.enable()
        await stop.wait()
    finally:
        await close_services(services, log)
        socks.close()


# --- supervision and teardown --------------------------------------------------------------


def _supervise(child: PlantedChild, services: ServicesProcess, signals: Signals, log: RunLog, startup_timeout: float,
               timeout_secs: float | None = None, tty: TerminalRelay | None = None) -> tuple[int, bool]:
    """Wait for the agent while forwarding signals (a second termination signal kills the whole
    sandbox) and watching the services process, which must serve within the sidecar start-up
    timeout (DESIGN §9) or the run stops: an agent whose connections would wait forever is
    stopped rather than left hanging. `timeout_secs` (--timeout): then SIGTERM to the agent's
    process group, SIGKILL to everything left after the grace period. (status, timed out)."""
    sup = Supervisor(on_early_signal=lambda _s: None)  # early signals ended the launch already
    sup.attach(child)
    start = time.monotonic()
    deadline = start + startup_timeout
    wall = start + timeout_secs if timeout_secs else None
    kill_at: float | None = None
    timed_out = False
    while True:
        watch = [child.proc_pidfd, signals.r, services.pidfd]
        if services.starting:
            watch.append(services.serving_r)
        if tty is not None:
            watch += ([tty.master] if tty.pty_open else []) + ([0] if tty.stdin_open else [])
        ends = [t for t in (deadline if services.starting else None, None if timed_out else wall, kill_at) if t is not None]
        timeout = max(min(ends) - time.monotonic(), 0) if ends else None
        ready = select.select(watch, [], [], timeout)[0]
        for signum in signals.take():
            if tty is not None and signum == signal.SIGWINCH:
                tty.resize()  # the kernel tells the agent's foreground job
                continue
            sup.handle(signum)
            if signum in TERMINATION and sup.escalated:
                log(f"second termination signal ({signum}): killing the sandbox", "warn")
        if tty is not None:
            if tty.master in ready:
                tty.to_user()
            if 0 in ready:
                tty.from_user()
        if child.proc_pidfd in ready:
            return child.status(), timed_out
        if services.serving_r in ready:
            if os.read(services.serving_r, 1):
                services.serving = True
                log("services serving the planted sockets and the sidecar", "info")
            else:
                services.serving_eof = True  # it is ending: its pidfd says how
        if services.pidfd in ready:
            _reap(services)
            raise SidecarError(
                f"the services process (sidecar, bridge, DNS stub) stopped unexpectedly ({_describe(services.status)}); "
                "the agent had no egress and was stopped; see run.log in the proof directory"
            )
        now = time.monotonic()
        if services.starting and now >= deadline:
            raise SidecarError(
                f"the services process (sidecar, bridge, DNS stub) did not serve within {startup_timeout:g}s; "
                "the agent was stopped; raise --sidecar-startup-timeout-secs on a slow machine"
            )
        if wall is not None and not timed_out and now >= wall:
            timed_out = True
            log(f"--timeout {timeout_secs:g}s reached: SIGTERM to the agent", "warn")
            child.forward_signal(signal.SIGTERM)
            kill_at = now + TIMEOUT_GRACE_SECS
        elif kill_at is not None and now >= kill_at:
            log(f"the agent outlived --timeout's {TIMEOUT_GRACE_SECS:g}s grace: killing the sandbox", "warn")
            child.kill_tree()
            kill_at = None


def _describe(wait_status: int | None) -> str:
    if wait_status is None:
        return "still running"
    if os.WIFSIGNALED(wait_status):
        return f"killed by signal {os.WTERMSIG(wait_status)}"
    return f"exit status {os.waitstatus_to_exitcode(wait_status)}"


def _reap(services: ServicesProcess) -> None:
    if services.status is None:
        services.status = os.waitpid(services.pid, 0)[1]


def _stop_services(services: ServicesProcess, log: RunLog) -> None:
    if services.status is None:
        os.close(services.stop_w)  # first: see _fork_services
        services.stop_w = -1
        try:
            signal.pidfd_send_signal(services.pidfd, signal.SIGTERM)  # stops a start-up that hangs
        except OSError:
            pass
        if not select.select([services.pidfd], [], [], _STOP_TIMEOUT)[0]:
            log(f"teardown: services did not stop within {_STOP_TIMEOUT:g}s; killing them", "error")
            try:
                signal.pidfd_send_signal(services.pidfd, signal.SIGKILL)
            except OSError:
                pass
        _reap(services)
        st = services.status
        assert st is not None  # reaped just above
        if not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0) and not (
            os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGTERM and not services.serving
        ):
            log(f"teardown: services process ended with {_describe(st)}", "error")
    if services.stop_w >= 0:
        os.close(services.stop_w)
    os.close(services.pidfd)
    os.close(services.serving_r)

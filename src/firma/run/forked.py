"""`firma run` with a backend that plants its sockets in the sandbox (bwrap): two processes.

The launcher (this process) is synchronous and never imports asyncio. It plans, gates, makes
the embedded sidecar ready in the sense of SPEC §9 (policy loaded, audit key checked, listener
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
import sys
import time
from typing import Any, TextIO

from ..backends.base import PlantedSockets
from ..core.model import PLANTED_DNS_ADDR, PLANTED_PROXY_ADDR, Check, RunPlan
from ..core.record import record
from ..errors import FirmaError, SidecarError
from ..core.hostfacts import Host
from .parts import (
    RunLog,
    RunRecord,
    abandon_run,
    build_envelope,
    gate,
    open_run,
    refuse_without_sidecar,
    seccomp_for,
    sidecar_listen,
    startup_done,
    unreachable_external,
)
from .signals import FORWARDED, TERMINATION, Supervisor, handled_signals

_STOP_TIMEOUT = 10.0  # the services drain and flush the audit log within this after SIGTERM
_REAP_TIMEOUT = 5.0


class Interrupted(Exception):
    """A termination signal arrived before the launch completed (the sandbox is then killed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """The launcher's signal handlers: they only record the signal; a wakeup pipe makes every
    wait of the launcher return, and the launcher acts on the recorded signals itself."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending: list[int] = []
        self._old: dict[int, Any] = {}
        self._old_wakeup: int | None = None  # set while installed

    def install(self) -> None:
        self._old_wakeup = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        for s in handled_signals():
            self._old[s] = signal.signal(s, self._record)

    def _record(self, signum: int, _frame) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        try:
            while os.read(self.r, 512):
                pass
        except BlockingIOError:
            pass
        got, self.pending = self.pending, []
        return got

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        for fd in (self.r, self.w):
            os.close(fd)
        self.r = self.w = -1


class LaunchWaits:
    """The backend's waits during the launch (see firma.backends.bwrap.backend.Waits), woken by
    signals: a termination signal raises Interrupted, SIGWINCH has no agent to go to yet."""

    def __init__(self, signals: Signals) -> None:
        self._signals = signals
        self.early: int | None = None

    def check(self) -> None:
        for s in self._signals.take():
            if s in TERMINATION and self.early is None:
                self.early = s
        if self.early is not None:
            raise Interrupted(self.early)

    def readable(self, fd: int, timeout: float) -> bool:
        ready = select.select([fd, self._signals.r], [], [], max(timeout, 0))[0]
        self.check()
        return fd in ready

    def pause(self, secs: float) -> None:
        select.select([self._signals.r], [], [], secs)
        self.check()


@record(frozen=False)
class EmbeddedSidecar:
    """The embedded sidecar made ready by the launcher, served by the services process."""

    policy: Any  # firma.core.policy.Policy
    listener: Any  # socket.socket, listening on `path`
    endpoint: str
    path: str


@record(frozen=False)
class ServicesProcess:
    pid: int
    pidfd: int
    serving_r: int  # one byte once everything serves; EOF when the process ends
    serving: bool = False
    serving_eof: bool = False
    status: int | None = None  # wait status once reaped

    @property
    def starting(self) -> bool:
        """Neither serving nor ending yet: its start-up deadline applies."""
        return not (self.serving or self.serving_eof)


def run(
    plan: RunPlan,
    host: Host,
    *,
    backend: Any,
    terminal: TextIO | None = None,
    log_level: str | None = None,
    log_file: str | None = None,
) -> int:
    """Run `plan` to completion with a planting backend; return the agent's exit status.

    Forks the services process from the calling process, so call it from a single-threaded one
    (the `firma` executable is): a thread holding a lock at the fork would leave it held there."""
    log = RunLog(terminal or sys.stderr, log_level)
    if log_file:
        log.add_file(log_file)
    try:
        return _run(plan, host, backend, log)
    finally:
        log.close()


def _run(plan: RunPlan, host: Host, backend: Any, log: RunLog) -> int:
    # 1. prepare + gates: nothing is started before these pass.
    proof = backend.prepare(plan, host)
    gate(proof, plan, log)
    refuse_without_sidecar(plan)
    if not plan.sidecar.embedded:
        from ..services.listen import probe  # noqa: PLC0415

        try:
            probe(plan.sidecar.endpoint, plan.sidecar.startup_timeout_secs)
        except FirmaError as exc:
            raise unreachable_external(plan, exc) from None
    artifact = seccomp_for(plan, host, backend)
    # From here a termination signal is recorded and acted on at the launch's next wait (so the
    # run dir made next is always torn down), not raised as KeyboardInterrupt anywhere.
    signals = Signals()
    signals.install()
    try:
        return _launch(plan, backend, log, proof, artifact, signals)
    finally:
        signals.uninstall()


def _launch(plan: RunPlan, backend: Any, log: RunLog, proof, artifact, signals: Signals) -> int:
    run = open_run(plan, proof, log, artifact)
    embedded = None
    if plan.sidecar.embedded:
        try:
            embedded = _ready_embedded(run)
        except BaseException:
            abandon_run(run)
            raise
    waits = LaunchWaits(signals)
    held = child = services = envelope = None
    status: int | None = None
    failed = True
    try:
        artifact_path = artifact.path if artifact is not None else None
        envelope = build_envelope(
            plan,
            proxy_url="http://%s:%d" % PLANTED_PROXY_ADDR,
            dns_stub_addr="%s:%d" % PLANTED_DNS_ADDR,
            routing=backend.routing(),
            seccomp_path=artifact_path,
            command_prefix=tuple(artifact.command_prefix) if artifact is not None else (),
        )
        # 2. launch: from here on firma's log lines stay off the agent's terminal.
        log.quiet = True
        waits.check()
        held = backend.build(envelope, run.add_check, log, waits)
        socks = held.socks
        run.planted.append(socks)
        waits.check()
        child = backend.release(held, run.add_check, waits)
        held = None
        startup_done()
        run.write_proof(envelope.invariants, ended=False, exit_status=None)
        # 3. services: forked only now, so their start-up (~40 ms of imports) competes with the
        # agent's start-up rather than with the sandbox checks and the release. Until they serve,
        # the agent's connections wait in the listeners' backlogs.
        services = _fork_services(run, embedded, socks)
        # The services process now holds the only copies of the listeners (fail closed).
        socks.close()
        if embedded is not None:
            embedded.listener.close()
        log(f"services process pid {services.pid}", "info")
        # 4. supervise
        status = _supervise(child, services, signals, log, plan.sidecar.startup_timeout_secs)
        failed = False
        log(f"agent exited with status {status}", "info")
        return status
    except Interrupted as stop:
        status = 128 + stop.signum
        log(f"launch interrupted by signal {stop.signum}", "warn")
        return status
    except FirmaError as exc:
        log(str(exc), "error")
        raise
    finally:
        log.quiet = False
        # Signals during teardown are recorded and ignored: teardown always completes.
        _teardown(run, backend, held, child, services, embedded, envelope, status, failed)


def _ready_embedded(run: RunRecord) -> EmbeddedSidecar:
    """SPEC §9 readiness, measured here: the policy loads, the audit key is a private PEM file
    (made now in a new state dir), the audit log opens, the listener is bound."""
    from ..services.audit_files import load_or_create_key, open_audit_log, read_key_file  # noqa: PLC0415
    from ..core.policy import Policy  # noqa: PLC0415
    from ..services.listen import bind_unix_listener  # noqa: PLC0415

    plan = run.plan
    policy = Policy.load(plan.allow_hosts, plan.policy_path)
    if read_key_file(run.dirs.key_path) is None:
        load_or_create_key(run.dirs.key_path)
    os.close(open_audit_log(run.dirs.audit_path, "fix its directory"))
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
    return EmbeddedSidecar(policy=policy, listener=listener, endpoint=endpoint, path=path)


# --- the services process ------------------------------------------------------------------


def _fork_services(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets) -> ServicesProcess:
    serving_r, serving_w = os.pipe2(os.O_CLOEXEC)
    ppid = os.getpid()
    # Blocked across the fork: the child resets the launcher's handlers before any of these
    # reaches it, so a SIGTERM from the launcher is never swallowed by a copied handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        os.close(serving_r)
        os.close(serving_w)
        raise SidecarError(f"cannot start the services process: {exc.strerror}; check the process limits") from None
    if pid == 0:
        code = 1
        try:
            os.close(serving_r)
            code = _services_main(run, embedded, socks, serving_w, ppid)
        except BaseException as exc:  # noqa: BLE001 - the services process never returns into the launcher
            try:
                run.log(f"services process failed: {exc!r}", "error")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.close(serving_w)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(serving_r)
        raise SidecarError(f"cannot watch the services process: {exc.strerror}") from None
    return ServicesProcess(pid=pid, pidfd=pidfd, serving_r=serving_r)


def _services_main(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets, serving_w: int, ppid: int) -> int:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until the services take it over (see _serve)
    for s in FORWARDED:
        if s != signal.SIGTERM:
            # ^C and hang-ups reach the launcher's whole process group: the launcher decides.
            signal.signal(s, signal.SIG_IGN if s in TERMINATION else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    _die_with_parent(ppid)
    gc.disable()  # start-up allocates only long-lived objects (see cli.entry); on again in _serve
    # The agent owns the terminal: nothing of the services goes there (errors go to run.log).
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    run.log.quiet = True
    import asyncio  # noqa: PLC0415 - the point of this process

    asyncio.run(_serve(run, embedded, socks, serving_w))
    return 0


def _die_with_parent(ppid: int) -> None:
    """SIGKILL when the launcher dies, even by SIGKILL: nothing of a run outlives it."""
    import ctypes  # noqa: PLC0415 - loaded already (planting)

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != ppid:  # the launcher died before the line above
        os._exit(1)


async def _serve(run: RunRecord, embedded: EmbeddedSidecar | None, socks: PlantedSockets, serving_w: int) -> None:
    import asyncio  # noqa: PLC0415

    from ..services.bridge import Bridge  # noqa: PLC0415
    from ..services.dns_stub import DnsStub  # noqa: PLC0415
    from ..services.sidecar import Sidecar, SidecarConfig  # noqa: PLC0415

    plan, log = run.plan, run.log
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _loop, ctx: log(f"service error: {ctx.get('message')}: {ctx.get('exception')!r}", "error")
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # from now on SIGTERM drains, then exits
    services: list[Any] = []
    sidecar = None
    try:
        if embedded is not None:
            sidecar = Sidecar(
                SidecarConfig(
                    allow_hosts=tuple(plan.allow_hosts),
                    policy_path=plan.policy_path,
                    audit_path=run.dirs.audit_path,
                    key_path=run.dirs.key_path,
                    monitor=plan.monitor,
                ),
                policy=embedded.policy,
            )
            endpoint = await sidecar.serve_unix_socket(embedded.listener, embedded.path)
            reporter = sidecar.dns_reporter(plan.identity.sandbox_id, plan.identity.session_id)
        else:
            endpoint, reporter = plan.sidecar.endpoint, None
        bridge = Bridge(sidecar_endpoint=endpoint, attribution=plan.identity.attribution_headers())
        services.append(bridge)
        await bridge.serve_sockets([socks.proxy_tcp])
        stub = DnsStub(on_query=reporter)
        services.append(stub)
        await stub.serve_sockets(socks.dns_udp, socks.dns_tcp)
        os.write(serving_w, b"1")
        if sidecar is not None:
            sidecar.audit.load_soon()  # parsed on the audit thread while the agent starts
        # Long-lived from here: keep the start-up heap out of collections, collect again.
        gc.freeze()
        gc.enable()
        await stop.wait()
    finally:
        for svc in reversed(services):
            try:
                await svc.aclose()
            except Exception as exc:  # noqa: BLE001
                log(f"teardown: {type(svc).__name__}: {exc}", "error")
        socks.close()
        if sidecar is not None:
            try:
                await sidecar.aclose()  # flushes the audit log
            except Exception as exc:  # noqa: BLE001
                log(f"teardown: sidecar: {exc}", "error")


# --- supervision and teardown --------------------------------------------------------------


def _supervise(child: Any, services: ServicesProcess, signals: Signals, log: RunLog, startup_timeout: float) -> int:
    """Wait for the agent while forwarding signals (a second termination signal kills the whole
    sandbox) and watching the services process, which must serve within the sidecar start-up
    timeout (SPEC §9) or the run stops: an agent whose connections would wait forever is
    stopped rather than left hanging."""
    sup = Supervisor(on_early_signal=lambda _s: None)  # early signals ended the launch already
    sup.attach(child)
    deadline = time.monotonic() + startup_timeout
    while True:
        watch = [child.proc_pidfd, signals.r, services.pidfd]
        if services.starting:
            watch.append(services.serving_r)
        timeout = max(deadline - time.monotonic(), 0) if services.starting else None
        ready = select.select(watch, [], [], timeout)[0]
        for signum in signals.take():
            sup.handle(signum)
            if signum in TERMINATION and sup.escalated:
                log(f"second termination signal ({signum}): killing the sandbox", "warn")
        if child.proc_pidfd in ready:
            return child.status()
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
        if not ready and services.starting:
            raise SidecarError(
                f"the services process (sidecar, bridge, DNS stub) did not serve within {startup_timeout:g}s; "
                "the agent was stopped; raise --sidecar-startup-timeout-secs on a slow machine"
            )


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
        try:
            signal.pidfd_send_signal(services.pidfd, signal.SIGTERM)
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
        if not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0) and not (
            os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGTERM and not services.serving
        ):
            log(f"teardown: services process ended with {_describe(st)}", "error")
    os.close(services.pidfd)
    os.close(services.serving_r)


def _teardown(run, backend, held, child, services, embedded, envelope, status, failed) -> None:
    """Reverse start order: the sandbox, the services (they flush the audit log), the copies of
    the sockets this process still holds, the proof, the run dir. Every step runs."""
    log = run.log
    if held is not None:
        backend.abort(held)
    if child is not None:
        try:
            child.kill_tree()
            if not select.select([child.proc_pidfd], [], [], _REAP_TIMEOUT)[0]:
                log("teardown: bwrap did not exit after SIGKILL", "error")
            else:
                child.status()
        except Exception as exc:  # noqa: BLE001
            log(f"teardown: sandbox: {exc}", "error")
        child.close()
    if services is not None:
        _stop_services(services, log)
    for socks in run.planted:
        socks.close()
    if embedded is not None:
        embedded.listener.close()
        try:
            os.unlink(embedded.path)
        except OSError:
            pass
    run.finish(envelope, status, failed=failed)

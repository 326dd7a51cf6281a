"""`firma run`: plan → prepare → gates → services → envelope → launch → supervise → teardown.

Generic over backends: PLANTED routing (bwrap) serves the bridge and DNS stub on sockets the
backend planted in the sandbox; HOST_LOOPBACK routing (vz, runner) starts them on 127.0.0.1:0
and hands their addresses to the backend in the envelope. Every step fails closed with a typed
error; teardown always runs, in reverse start order."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from typing import Any, Awaitable, Callable, TextIO

from .backends.base import LaunchHooks, PlantedSockets, RoutingMode, RoutingPlan
from .core import launchenv, proofdoc
from .core.model import (
    DEFAULT_INVARIANTS,
    PLANTED_DNS_ADDR,
    PLANTED_PROXY_ADDR,
    Check,
    Mount,
    EnforcementProof,
    ExecutionEnvelope,
    NetworkEndpoints,
    RunPlan,
)
from .core.record import record, field
from .errors import FirmaError, GateError, SidecarError
from .host import Host
from . import statedir
from .supervisor import Supervisor

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "off": 100}
DNS_STUB_ENV = "FIRMA_DNS_STUB_ADDR"


def _now() -> str:
    """UTC now as 2026-01-02T03:04:05.678Z (via time, not datetime: launch latency)."""
    secs, ns = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"


# --- host services ------------------------------------------------------------------------


@record
class ServiceKit:
    """Constructors of the host services (firma.services); tests may pass fakes."""

    make_sidecar: Callable[..., Any]  # (allow_hosts, policy_path, audit_path, key_path, monitor)
    make_bridge: Callable[..., Any]  # (sidecar_endpoint, attribution)
    make_dns_stub: Callable[..., Any]  # (on_query)
    probe_endpoint: Callable[[str, float], Awaitable[None]]


def default_kit() -> ServiceKit:
    try:
        from .services.bridge import Bridge
        from .services.dns_stub import DnsStub
        from .services.sidecar import Sidecar, SidecarConfig, probe_endpoint
    except ImportError as exc:
        raise SidecarError(f"host services are not available in this install ({exc}); reinstall firma") from None

    def make_sidecar(*, allow_hosts, policy_path, audit_path, key_path, monitor):
        return Sidecar(
            SidecarConfig(
                allow_hosts=tuple(allow_hosts),
                policy_path=policy_path,
                audit_path=audit_path,
                key_path=key_path,
                monitor=monitor,
            )
        )

    return ServiceKit(
        make_sidecar=make_sidecar,
        make_bridge=lambda *, sidecar_endpoint, attribution: Bridge(
            sidecar_endpoint=sidecar_endpoint, attribution=attribution
        ),
        make_dns_stub=lambda *, on_query=None: DnsStub(on_query=on_query),
        probe_endpoint=probe_endpoint,
    )


# --- firma's own log lines ----------------------------------------------------------------


class RunLog:
    """firma's log lines: always to run.log (and --log-file); to the terminal only while no agent
    owns it, and only at or above the terminal level."""

    def __init__(self, terminal: TextIO, level: str | None) -> None:
        self._terminal = terminal
        self._term_level = LEVELS.get((level or "warn").strip().lower(), 30)
        self._files: list[TextIO] = []
        self.quiet = False  # True while the agent runs

    def add_file(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._files.append(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))

    def __call__(self, msg: str, level: str = "info") -> None:
        n = LEVELS.get(level, 20)
        line = f"{_now()} {level.upper():5} firma: {msg}\n"
        for f in self._files:
            try:
                f.write(line)
            except (OSError, ValueError):
                pass
        if not self.quiet and n >= self._term_level:
            try:
                self._terminal.write(f"firma: {level.upper()} {msg}\n")
                self._terminal.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()


# --- gates --------------------------------------------------------------------------------


def gate(proof: EnforcementProof, plan: RunPlan, log: Callable[..., None]) -> None:
    """SPEC §4 gates, in order, before anything starts."""
    if not proof.fail_closed:
        raise GateError(f"backend error ({proof.backend}): fail-closed policy is disabled")
    if not proof.structural:
        if not plan.allow_non_structural:
            raise GateError(
                f"backend {proof.backend} is not structural ({proof.network_confinement.value}): "
                "agent egress would NOT be mandatorily confined; to accept that, pass "
                "--allow-non-structural or set FIRMA_RUN_ALLOW_NON_STRUCTURAL=1 "
                "(or run.allow_non_structural = true)"
            )
        log(
            "backend compatibility proof — proxy-only mode; agent egress is NOT mandatorily "
            f"confined; backend={proof.backend} confinement={proof.network_confinement.value} "
            f"detail={proof.detail!r} enforced=false",
            "warn",
        )
    else:
        log(
            f"backend network enforcement proof backend={proof.backend} structural=true "
            f"fail_closed={str(proof.fail_closed).lower()} "
            f"confinement={proof.network_confinement.value} detail={proof.detail!r} enforced=true",
            "info",
        )


# --- the run ------------------------------------------------------------------------------


@record(frozen=False)
class _Run:
    plan: RunPlan
    proof: EnforcementProof
    dirs: statedir.RunDirs
    log: RunLog
    checks: list[Check] = field(default_factory=list)
    sidecar: Any = None
    sidecar_endpoint: str | None = None
    services: list[Any] = field(default_factory=list)  # bridge, dns stub (closed in reverse)
    planted: list[PlantedSockets] = field(default_factory=list)
    socket_dir: str | None = None  # private short dir holding the sidecar socket, when used
    started_at: str = field(default_factory=_now)
    proof_path: str | None = None

    def add_check(self, check: Check) -> None:
        self.checks.append(check)
        self.log(f"check {check.name} ok={str(check.ok).lower()} {check.detail}", "info" if check.ok else "error")

    def write_proof(self, invariants, *, ended: bool, exit_status: int | None) -> None:
        doc = proofdoc.build(
            identity=self.plan.identity,
            proof=self.proof,
            invariants=invariants,
            checks=self.checks,
            sidecar_endpoint=self.sidecar_endpoint,
            sidecar_embedded=self.plan.sidecar.embedded,
            started_at=self.started_at,
            ended_at=_now() if ended else None,
            exit_status=exit_status,
        )
        text = proofdoc.dumps(doc)
        path = self.dirs.proof_path(self.plan.identity.sandbox_id)
        statedir.write_private(path, text)
        self.proof_path = path
        if self.plan.proof_file:
            statedir.write_private(self.plan.proof_file, text)


def startup_done() -> None:
    """The agent runs: when the `firma` entry point disabled garbage collection for start-up,
    keep the start-up heap (modules, plan) out of future collections and collect again, since
    the services now run as long as the agent does."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _seccomp_for(plan: RunPlan, host: Host, backend: Any):
    """Compile/verify the managed filter on Linux (the hardening list always applies).
    Returns the artifact or None when this host has no seccomp (non-Linux)."""
    if not host.is_linux:
        return None
    from . import seccomp  # noqa: PLC0415 - Linux only

    artifact = seccomp.prepare_filter(plan.seccomp_policy, plan.state_root, host.machine)
    if hasattr(backend, "use_seccomp_artifact"):
        backend.use_seccomp_artifact(artifact)
    return artifact


def build_envelope(
    plan: RunPlan,
    *,
    proxy_url: str,
    dns_stub_addr: str | None,
    routing: RoutingPlan,
    seccomp_path: str | None,
    command_prefix: tuple[str, ...] = (),
) -> ExecutionEnvelope:
    extra = {}
    if routing.export_dns_stub_env and dns_stub_addr:
        extra[DNS_STUB_ENV] = dns_stub_addr
    env = launchenv.with_proxy(plan.base_env, proxy_url, extra=extra)
    argv = tuple(command_prefix) + tuple(plan.argv)
    return ExecutionEnvelope(
        sandbox_id=plan.identity.sandbox_id,
        runtime_dir=plan.runtime_dir,
        executable=argv[0],
        args=argv[1:],
        cwd=plan.cwd,
        env=env,
        identity_mode=plan.identity_mode,
        home=plan.home,
        seccomp_filter_path=seccomp_path,
        mounts=plan.mounts + tuple(_writable_home_mounts(plan)),
        mask_home_paths=plan.mask_home_paths,
        network=NetworkEndpoints(
            proxy_url=proxy_url,
            dns_stub_addr=dns_stub_addr,
            attribution_headers=plan.identity.attribution_headers(),
        ),
    )


def _writable_home_mounts(plan: RunPlan):
    """Profile paths under $HOME made writable (e.g. ~/.claude), when they exist."""
    for rel in plan.writable_home_paths:
        p = os.path.join(plan.home, rel)
        if os.path.exists(p):
            yield Mount(p, p, False)


async def execute(
    plan: RunPlan,
    host: Host,
    *,
    backend: Any = None,
    kit: ServiceKit | None = None,
    terminal: TextIO | None = None,
    log_level: str | None = None,
    log_file: str | None = None,
) -> int:
    """Run `plan` to completion; return the agent's exit status. Raises FirmaError."""
    from .backends import backend_for

    terminal = terminal or sys.stderr
    log = RunLog(terminal, log_level)
    if log_file:
        log.add_file(log_file)
    try:
        return await _execute(plan, host, backend or backend_for(plan.backend), kit, log)
    finally:
        log.close()


async def _execute(plan: RunPlan, host: Host, backend: Any, kit: ServiceKit | None, log: RunLog) -> int:
    # 1. prepare + gates: nothing is started before these pass.
    proof = backend.prepare(plan, host)
    gate(proof, plan, log)
    routing = backend.routing()
    kit = kit or default_kit()
    sidecar = None
    if plan.sidecar.embedded:
        if not plan.sidecar.autostart:
            raise SidecarError(
                "no sidecar endpoint given and --no-autostart forbids starting the embedded one; "
                "pass --sidecar tcp://HOST:PORT or unix:///PATH (or FIRMA_SIDECAR_ENDPOINT)"
            )
    else:
        try:
            await kit.probe_endpoint(plan.sidecar.endpoint, plan.sidecar.startup_timeout_secs)
        except FirmaError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to answer refuses the launch
            raise SidecarError(
                f"external sidecar {plan.sidecar.endpoint} is unreachable ({exc}); start it or fix --sidecar"
            ) from None
    artifact = _seccomp_for(plan, host, backend)

    dirs = statedir.create(plan.state_root, plan.identity.sandbox_id)
    run = _Run(plan=plan, proof=proof, dirs=dirs, log=log)
    log.add_file(dirs.run_log)
    for stale in statedir.sweep_stale(plan.state_root, time.time()):
        log(f"removed stale run directory of a launcher that died: {stale}", "info")
    if artifact is not None:
        run.add_check(Check("seccomp_artifact_sha256", True, artifact.proof_detail()))
    if plan.sidecar.embedded:
        # Concurrent runs share the state root; the audit key is created atomically by the
        # audit writer, so no lock is needed here.
        try:
            sidecar = kit.make_sidecar(
                allow_hosts=plan.allow_hosts,
                policy_path=plan.policy_path,
                audit_path=dirs.audit_path,
                key_path=dirs.key_path,
                monitor=plan.monitor,
            )
        except BaseException:
            # Nothing was started (bad policy, unreadable key): leave no run dir behind.
            log.close()
            statedir.remove_run_dir(dirs, keep_log_as=None)
            raise
        run.sidecar = sidecar
    else:
        run.sidecar_endpoint = plan.sidecar.endpoint
        run.add_check(Check("sidecar_ready", True, f"external sidecar answered at {plan.sidecar.endpoint} before launch"))

    loop = asyncio.get_running_loop()
    # Errors inside services must not print on the agent's terminal: they go to run.log.
    loop.set_exception_handler(
        lambda _loop, ctx: log(f"service error: {ctx.get('message')}: {ctx.get('exception')!r}", "error")
    )
    main_task = asyncio.current_task()
    sup = Supervisor(on_early_signal=lambda _s: main_task.cancel() if main_task else None)
    sup.install()
    child = None
    status: int | None = None
    failed = True
    envelope: ExecutionEnvelope | None = None
    try:
        # 2. services: the embedded sidecar starts now, in parallel with the sandbox.
        if sidecar is not None:
            sidecar_task = loop.create_task(_start_sidecar(run, sidecar, plan, kit))
        else:
            sidecar_task = loop.create_task(_ready_external(run, plan, kit))

        attribution = plan.identity.attribution_headers()
        reporter = None
        if sidecar is not None and hasattr(sidecar, "dns_reporter"):
            reporter = sidecar.dns_reporter(plan.identity.sandbox_id, plan.identity.session_id)

        async def serve_planted(socks: PlantedSockets) -> None:
            run.planted.append(socks)
            endpoint = await sidecar_task
            bridge = kit.make_bridge(sidecar_endpoint=endpoint, attribution=attribution)
            run.services.append(bridge)
            await bridge.serve_sockets([socks.proxy_tcp])
            stub = kit.make_dns_stub(on_query=reporter)
            run.services.append(stub)
            await stub.serve_sockets(socks.dns_udp, socks.dns_tcp)

        seccomp_path = artifact.path if artifact is not None else None
        prefix = tuple(artifact.command_prefix) if artifact is not None else ()
        if routing.mode is RoutingMode.PLANTED:
            envelope = build_envelope(
                plan,
                proxy_url="http://%s:%d" % PLANTED_PROXY_ADDR,
                dns_stub_addr="%s:%d" % PLANTED_DNS_ADDR,
                routing=routing,
                seccomp_path=seccomp_path,
                command_prefix=prefix,
            )
        else:
            endpoint = await sidecar_task
            bridge = kit.make_bridge(sidecar_endpoint=endpoint, attribution=attribution)
            run.services.append(bridge)
            bport = await bridge.serve_address("127.0.0.1", 0)
            dns_addr = None
            if routing.dns_stub:
                stub = kit.make_dns_stub(on_query=reporter)
                run.services.append(stub)
                dport = await stub.serve_address("127.0.0.1", 0)
                dns_addr = f"127.0.0.1:{dport}"
            run.add_check(Check("host_services", True, f"bridge 127.0.0.1:{bport}" + (f", dns stub {dns_addr}" if dns_addr else "")))
            envelope = build_envelope(
                plan,
                proxy_url=f"http://127.0.0.1:{bport}",
                dns_stub_addr=dns_addr,
                routing=routing,
                seccomp_path=seccomp_path,
                command_prefix=prefix,
            )

        hooks = LaunchHooks(serve_planted=serve_planted, add_check=run.add_check, log=log)
        # 3. launch: from here on firma's log lines stay off the agent's terminal.
        log.quiet = True
        launch_task = loop.create_task(backend.launch(envelope, hooks))
        try:
            child = await launch_task
        finally:
            if not sidecar_task.done():
                sidecar_task.cancel()
        sup.attach(child)
        startup_done()
        if sup.early_signal is not None:
            child.forward_signal(sup.early_signal)
        run.write_proof(envelope.invariants, ended=False, exit_status=None)
        # 4. supervise
        status = await sup.wait()
        failed = False
        log(f"agent exited with status {status}", "info")
        return status
    except asyncio.CancelledError:
        if sup.early_signal is not None:
            status = 128 + sup.early_signal
            log(f"launch interrupted by signal {sup.early_signal}", "warn")
            return status
        raise
    except FirmaError as exc:
        log(str(exc), "error")
        raise
    finally:
        log.quiet = False
        sup.uninstall()
        await _teardown(run, child, envelope, status, failed)


_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def _sidecar_listen(run: _Run) -> str:
    """The embedded sidecar listens on a unix socket in a 0700 directory: only this launcher's
    bridge can reach it. On host loopback TCP any local process could submit requests with forged
    attribution headers and write them into the signed audit."""
    path = os.path.join(run.dirs.run_dir, "sidecar.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        import tempfile  # noqa: PLC0415 - rare path; tempfile costs a launch ~2 ms

        run.socket_dir = tempfile.mkdtemp(prefix="firma-sidecar-")  # 0700, short path
        path = os.path.join(run.socket_dir, "sidecar.sock")
    return f"unix://{path}"


async def _start_sidecar(run: _Run, sidecar: Any, plan: RunPlan, kit: ServiceKit) -> str:
    timeout = plan.sidecar.startup_timeout_secs
    try:
        endpoint = await asyncio.wait_for(sidecar.start(_sidecar_listen(run)), timeout)
    except asyncio.TimeoutError:
        raise SidecarError(
            f"embedded sidecar was not ready within {timeout:g}s; refusing to start the agent; "
            "raise --sidecar-startup-timeout-secs"
        ) from None
    run.sidecar_endpoint = endpoint
    await _probe(run, endpoint, plan, kit, embedded=True)
    return endpoint


async def _ready_external(run: _Run, plan: RunPlan, kit: ServiceKit) -> str:
    return plan.sidecar.endpoint


async def _probe(run: _Run, endpoint: str, plan: RunPlan, kit: ServiceKit, *, embedded: bool) -> None:
    try:
        await kit.probe_endpoint(endpoint, plan.sidecar.startup_timeout_secs)
    except Exception as exc:  # noqa: BLE001
        run.add_check(Check("sidecar_ready", False, f"{endpoint}: {exc}"))
        raise SidecarError(f"sidecar at {endpoint} did not answer ({exc}); refusing to start the agent") from None
    run.add_check(Check("sidecar_ready", True, f"{'embedded' if embedded else 'external'} sidecar answered at {endpoint}"))


async def _teardown(run: _Run, child: Any, envelope: ExecutionEnvelope | None, status: int | None, failed: bool) -> None:
    """Reverse start order: the sandbox, then stop accepting, planted sockets, sidecar (flushes
    audit), then the proof, then the run dir. Every step runs whatever the previous did."""
    log = run.log
    if child is not None:
        try:
            child.kill_tree()
            # Reap bwrap so nothing of the run survives us.
            await asyncio.wait_for(child.wait(), 5)
        except Exception as exc:  # noqa: BLE001
            log(f"teardown: sandbox: {exc}", "error")
        close = getattr(child, "close", None)
        if close:
            close()
    for svc in reversed(run.services):
        try:
            await svc.aclose()
        except Exception as exc:  # noqa: BLE001
            log(f"teardown: {type(svc).__name__}: {exc}", "error")
    for socks in run.planted:
        socks.close()
    if run.sidecar is not None:
        try:
            await run.sidecar.aclose()
        except Exception as exc:  # noqa: BLE001
            log(f"teardown: sidecar: {exc}", "error")
    if run.socket_dir is not None:
        statedir.remove_tree(run.socket_dir)
    invariants = envelope.invariants if envelope is not None else DEFAULT_INVARIANTS
    try:
        run.write_proof(invariants, ended=True, exit_status=status)
        log(f"proof written to {run.proof_path}", "info")
    except OSError as exc:
        log(f"teardown: cannot write proof: {exc}", "error")
    if not run.plan.keep_markers:
        keep = None
        if failed:
            keep = os.path.join(run.dirs.proofs_dir, f"{run.plan.identity.sandbox_id}.run.log")
        statedir.remove_run_dir(run.dirs, keep_log_as=keep)

"""The asyncio lifecycle of a run for HOST_LOOPBACK routing (vz, runner): plan → prepare → gates
→ services → envelope → launch → supervise → teardown, all in one process. The bridge and DNS
stub start on 127.0.0.1:0 and their addresses go to the backend in the envelope.

A backend that plants its sockets in the sandbox (bwrap, PLANTED routing) runs through
firma.run.forked instead: a synchronous launcher and a services process. Every step fails
closed with a typed error; teardown always runs, in reverse start order."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable, TextIO

from ..backends.base import LaunchHooks, PlantedSockets, RoutingMode
from ..core.model import (
    Check,
    ExecutionEnvelope,
    RunPlan,
)
from ..core.record import record
from ..errors import BackendError, FirmaError, SidecarError
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
from .signals import Supervisor


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
        from ..services.bridge import Bridge
        from ..services.dns_stub import DnsStub
        from ..services.sidecar import Sidecar, SidecarConfig, probe_endpoint
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


# --- the run ------------------------------------------------------------------------------


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
    from ..backends import backend_for

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
    if routing.mode is not RoutingMode.HOST_LOOPBACK:
        raise BackendError(
            f"backend {proof.backend} plants its sockets in the sandbox; run it with "
            "firma.run.forked.run (as `firma run` does), not the asyncio lifecycle"
        )
    kit = kit or default_kit()
    sidecar = None
    refuse_without_sidecar(plan)
    if not plan.sidecar.embedded:
        try:
            await kit.probe_endpoint(plan.sidecar.endpoint, plan.sidecar.startup_timeout_secs)
        except Exception as exc:  # noqa: BLE001 - any failure to answer refuses the launch
            raise unreachable_external(plan, exc) from None
    artifact = seccomp_for(plan, host, backend)
    run = open_run(plan, proof, log, artifact)
    if plan.sidecar.embedded:
        # Concurrent runs share the state root; the audit key is created atomically by the
        # audit writer, so no lock is needed here.
        try:
            sidecar = kit.make_sidecar(
                allow_hosts=plan.allow_hosts,
                policy_path=plan.policy_path,
                audit_path=run.dirs.audit_path,
                key_path=run.dirs.key_path,
                monitor=plan.monitor,
            )
        except BaseException:
            abandon_run(run)
            raise
        run.sidecar = sidecar

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

        seccomp_path = artifact.path if artifact is not None else None
        prefix = tuple(artifact.command_prefix) if artifact is not None else ()
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

        hooks = LaunchHooks(serve_planted=_no_planting, add_check=run.add_check, log=log)
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


async def _no_planting(_socks: PlantedSockets) -> None:
    raise BackendError("a HOST_LOOPBACK backend planted sockets; its routing() is wrong")


async def _start_sidecar(run: RunRecord, sidecar: Any, plan: RunPlan, kit: ServiceKit) -> str:
    timeout = plan.sidecar.startup_timeout_secs
    try:
        endpoint = await asyncio.wait_for(sidecar.start(sidecar_listen(run)), timeout)
    except asyncio.TimeoutError:
        raise SidecarError(
            f"embedded sidecar was not ready within {timeout:g}s; refusing to start the agent; "
            "raise --sidecar-startup-timeout-secs"
        ) from None
    run.sidecar_endpoint = endpoint
    await _probe(run, endpoint, plan, kit, embedded=True)
    return endpoint


async def _ready_external(run: RunRecord, plan: RunPlan, kit: ServiceKit) -> str:
    return plan.sidecar.endpoint


async def _probe(run: RunRecord, endpoint: str, plan: RunPlan, kit: ServiceKit, *, embedded: bool) -> None:
    try:
        await kit.probe_endpoint(endpoint, plan.sidecar.startup_timeout_secs)
    except Exception as exc:  # noqa: BLE001
        run.add_check(Check("sidecar_ready", False, f"{endpoint}: {exc}"))
        raise SidecarError(f"sidecar at {endpoint} did not answer ({exc}); refusing to start the agent") from None
    run.add_check(Check("sidecar_ready", True, f"{'embedded' if embedded else 'external'} sidecar answered at {endpoint}"))


async def _teardown(run: RunRecord, child: Any, envelope: ExecutionEnvelope | None, status: int | None, failed: bool) -> None:
    """Reverse start order: the sandbox, then stop accepting, planted sockets, sidecar (flushes
    audit), then the proof, then the run dir. Every step runs whatever the previous did."""
    log = run.log
    if child is not None:
        try:
            child.kill_tree()
            # Reap the child so nothing of the run survives us.
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
    if run.sidecar is not None:
        try:
            await run.sidecar.aclose()
        except Exception as exc:  # noqa: BLE001
            log(f"teardown: sidecar: {exc}", "error")
    run.finish(envelope, status, failed=failed)

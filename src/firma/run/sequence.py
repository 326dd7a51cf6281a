"""The one launch sequence of `firma run`: prepare → gates → sidecar ready → build → release →
proof → serve → supervise → teardown → workspace check. Every step fails closed with a typed error; teardown
always runs, in reverse start order.

Where the services (sidecar, bridge, DNS stub) live is a `Hosting`, chosen by the backend's
routing here and nowhere else: PLANTED (bwrap) runs through firma.run.forked, a synchronous
launcher whose services process serves the sockets planted in the sandbox; HOST_LOOPBACK (vz,
runner) runs through firma.run.inprocess, the services in asyncio in this process on host
loopback.

The sequence is written once, as a coroutine. The in-process hosting awaits it in an event loop;
the forked hosting's steps never suspend, so `drive` runs it to its end with one `send`, and the
launcher never imports asyncio (importing it is a third of a launch)."""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import TYPE_CHECKING, Coroutine, Protocol, TextIO, TypeVar, cast

from ..backends.base import Backend, LaunchedChild, PlantingBackend, RoutingMode, RoutingPlan
from ..core.hostfacts import Host
from ..core import runsummary
from ..core.caches import TARGET_ROOT as CACHE_TARGET_ROOT
from ..core.model import EnforcementProof, ExecutionEnvelope, RunPlan
from ..errors import FirmaError
from .envelope import build_envelope, seccomp_for
from .gates import gate, refuse_without_sidecar
from .log import RunLog
from .. import privfs
from .record import RunRecord, abandon_run, agent_writable, open_run, write_output
from .workspace_check import Baseline, check_workspace, take_baseline

if TYPE_CHECKING:
    from ..seccomp.store import SeccompArtifact

T = TypeVar("T")


class Hosting(Protocol):
    """How the services of a run are hosted; the sequence calls these in its order."""

    async def probe_external(self, plan: RunPlan) -> None:
        """The external sidecar answers; raise SidecarError if it does not."""

    def take_signals(self) -> None:
        """From here until `restore_signals` the hosting owns the launcher's signals."""

    def restore_signals(self) -> None:
        """Give the signals back (after teardown, or before it: the hosting knows)."""

    async def ready_sidecar(self, run: RunRecord) -> None:
        """Make the embedded sidecar ready to serve; on failure nothing of the run exists yet."""

    async def start_services(self, run: RunRecord, routing: RoutingPlan) -> tuple[str, str | None]:
        """The proxy URL and DNS stub address the agent's envelope names."""

    async def launch(self, run: RunRecord, envelope: ExecutionEnvelope) -> LaunchedChild:
        """Build and release the sandbox: the agent runs confined when this returns."""

    async def serve(self, run: RunRecord) -> None:
        """The services serve the agent from now on (or already did)."""

    async def supervise(self, run: RunRecord, child: LaunchedChild) -> int:
        """Wait for the agent, forwarding signals; its exit status."""

    def interrupted(self, exc: BaseException) -> int | None:
        """The signal number when `exc` means a termination signal stopped the launch."""

    async def teardown(self, run: RunRecord, child: LaunchedChild | None) -> None:
        """Stop the sandbox and the services; every step runs whatever the previous did."""


def run(
    plan: RunPlan,
    host: Host,
    *,
    backend: Backend | None = None,
    terminal: TextIO | None = None,
    log_level: str | None = None,
    log_file: str | None = None,
) -> int:
    """Run `plan` to completion; return the agent's exit status. Raises FirmaError.

    A PLANTED run forks its services process from the calling process, so call this from a
    single-threaded one (the `firma` executable is): a thread holding a lock at the fork would
    leave it held there."""
    log = RunLog(terminal or sys.stderr, log_level)
    if log_file:
        # opened now and appended to through its descriptor; no link on the way where the agent writes
        for root in agent_writable(plan):
            privfs.refuse_links_within(os.path.abspath(log_file), root)
        log.add_file(log_file)
    try:
        if backend is None:
            from ..backends import backend_for  # noqa: PLC0415 - loads only the backend in use

            backend = backend_for(plan.backend)
        # 1. prepare + gates: nothing is started before these pass. Kept caches' directories are
        # firma's own (0700, never a link): made now, so prepare finds every mount source.
        for m in plan.mounts:
            if m.target.startswith(CACHE_TARGET_ROOT + "/"):
                privfs.ensure_dir(m.source)
        proof = backend.prepare(plan, host)
        gate(proof, plan, log)
        refuse_without_sidecar(plan)
        routing = backend.routing()
        if routing.mode is RoutingMode.PLANTED:
            from .forked import ForkedHosting  # noqa: PLC0415 - only the hosting in use is loaded

            forked = ForkedHosting(cast(PlantingBackend, backend), log, host.environ)
            return drive(_launch(plan, host, proof, routing, forked, log))
        import asyncio  # noqa: PLC0415 - only the in-process hosting runs an event loop

        from .inprocess import InProcessHosting  # noqa: PLC0415 - only the hosting in use is loaded

        return asyncio.run(_launch(plan, host, proof, routing, InProcessHosting(backend, log, owner_only=host.is_linux, bridge_credential=host.is_macos), log))
    finally:
        log.close()


def drive(coro: Coroutine[object, None, T]) -> T:
    """Run a coroutine that never suspends to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a step of the synchronous launch suspended")


async def _launch(
    plan: RunPlan, host: Host, proof: EnforcementProof, routing: RoutingPlan, hosting: Hosting, log: RunLog
) -> int:
    if not plan.sidecar.embedded:
        await hosting.probe_external(plan)
    artifact = seccomp_for(plan, host)
    # From here the hosting owns the signals, so the run dir made next is always torn down.
    hosting.take_signals()
    try:
        return await _run(plan, proof, routing, hosting, log, artifact, host.setsid_path)
    finally:
        hosting.restore_signals()


async def _run(
    plan: RunPlan,
    proof: EnforcementProof,
    routing: RoutingPlan,
    hosting: Hosting,
    log: RunLog,
    artifact: SeccompArtifact | None,
    setsid: str | None = None,
) -> int:
    run = open_run(plan, proof, log, artifact)
    # 2. sidecar ready
    if plan.sidecar.embedded:
        try:
            await hosting.ready_sidecar(run)
        except BaseException:
            abandon_run(run)
            raise
    child: LaunchedChild | None = None
    envelope: ExecutionEnvelope | None = None
    status: int | None = None
    baseline: Baseline | None = None
    failed = True
    try:
        proxy_url, dns_stub_addr = await hosting.start_services(run, routing)
        envelope = build_envelope(
            plan, proxy_url=proxy_url, dns_stub_addr=dns_stub_addr, routing=routing, artifact=artifact, setsid=setsid
        )
        # 3. build + release: from here on firma's log lines stay off the agent's terminal.
        log.quiet = True
        # Before the release: what the agent changes from here on is newer than the baseline.
        baseline = take_baseline(plan, run.dirs.run_dir)
        child = await hosting.launch(run, envelope)
        _startup_done()
        # 4. proof, serve, supervise
        run.write_proof(envelope.invariants, ended=False, exit_status=None)
        await hosting.serve(run)
        status = await hosting.supervise(run, child)
        failed = False
        log(f"agent exited with status {status}", "info")
    except BaseException as exc:
        signum = hosting.interrupted(exc)
        if signum is None:
            if isinstance(exc, FirmaError):
                log(str(exc), "error")
            raise
        status = 128 + signum
        log(f"launch interrupted by signal {signum}", "warn")
    finally:
        # 5. teardown, then the post-run workspace check: nothing of the agent's runs any more.
        log.quiet = False
        await hosting.teardown(run, child)
        if child is not None:
            run.limit_notes = child.limit_notes
        if baseline is not None:
            status = check_workspace(run, baseline, status)
        run.finish(envelope, status, failed=failed)
        _report(run)
    assert status is not None  # set by supervise or by the interruption; anything else raised
    if run.output_error is not None:
        # The agent may have swapped the directory for a link: nothing was written there.
        sys.stderr.write(f"[ERR]  {run.output_error}\n")
        return status or 1
    return status


def _report(run: RunRecord) -> None:
    """The run summary: on stderr unless --quiet, as JSON with --summary-json (DESIGN §4)."""
    if run.summary is None:
        return
    if not run.plan.quiet:
        try:
            sys.stderr.write(runsummary.render(run.summary))
            sys.stderr.flush()
        except OSError:
            pass
    if run.plan.summary_json and run.summary_pin is not None and run.output_error is None:
        run.output_error = write_output(run.summary_pin, run.plan.summary_json,
                                        json.dumps(run.summary.as_json(), indent=2) + "\n", "--summary-json", None)


def _startup_done() -> None:
    """The agent runs: when the `firma` entry point disabled garbage collection for start-up,
    keep the start-up heap (modules, plan) out of future collections and collect again, since
    the services now run as long as the agent does."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()

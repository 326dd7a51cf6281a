"""What both launchers of `firma run` share: firma's log lines, the SPEC §4 gates, the
envelope, the managed seccomp filter and the run's record (checks, proof). No asyncio here: the
synchronous launcher of planted-socket backends (firma.run.forked) imports this module too."""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, TextIO

from ..backends.base import PlantedSockets, RoutingPlan
from ..core import launchenv, proofdoc
from ..core.model import DEFAULT_INVARIANTS, Check, EnforcementProof, ExecutionEnvelope, Mount, NetworkEndpoints, RunPlan
from ..core.record import record, field
from ..errors import GateError, SidecarError
from ..core.hostfacts import Host
from . import state as statedir

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "off": 100}
DNS_STUB_ENV = "FIRMA_DNS_STUB_ADDR"


def _now() -> str:
    """UTC now as 2026-01-02T03:04:05.678Z (via time, not datetime: launch latency)."""
    secs, ns = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"


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


@record(frozen=False)
class RunRecord:
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

    def finish(self, envelope: ExecutionEnvelope | None, status: int | None, *, failed: bool) -> None:
        """The last steps of every teardown: the private socket dir, the final proof, the run
        dir (a failed run keeps its run.log next to the proof)."""
        if self.socket_dir is not None:
            statedir.remove_tree(self.socket_dir)
        invariants = envelope.invariants if envelope is not None else DEFAULT_INVARIANTS
        try:
            self.write_proof(invariants, ended=True, exit_status=status)
            self.log(f"proof written to {self.proof_path}", "info")
        except OSError as exc:
            self.log(f"teardown: cannot write proof: {exc}", "error")
        if not self.plan.keep_markers:
            keep = None
            if failed:
                keep = os.path.join(self.dirs.proofs_dir, f"{self.plan.identity.sandbox_id}.run.log")
            statedir.remove_run_dir(self.dirs, keep_log_as=keep)


def refuse_without_sidecar(plan: RunPlan) -> None:
    """The embedded sidecar is the only one and --no-autostart forbids it: refuse (SPEC §4)."""
    if plan.sidecar.embedded and not plan.sidecar.autostart:
        raise SidecarError(
            "no sidecar endpoint given and --no-autostart forbids starting the embedded one; "
            "pass --sidecar tcp://HOST:PORT or unix:///PATH (or FIRMA_SIDECAR_ENDPOINT)"
        )


def unreachable_external(plan: RunPlan, exc: BaseException) -> SidecarError:
    return SidecarError(f"external sidecar {plan.sidecar.endpoint} is unreachable ({exc}); start it or fix --sidecar")


def open_run(plan: RunPlan, proof: EnforcementProof, log: RunLog, artifact) -> RunRecord:
    """The run's directory and record, once the gates passed: run.log joins firma's log, stale
    run dirs of dead launchers are swept, the seccomp artifact is recorded."""
    dirs = statedir.create(plan.state_root, plan.identity.sandbox_id)
    run = RunRecord(plan=plan, proof=proof, dirs=dirs, log=log)
    log.add_file(dirs.run_log)
    for stale in statedir.sweep_stale(plan.state_root, time.time()):
        log(f"removed stale run directory of a launcher that died: {stale}", "info")
    if artifact is not None:
        run.add_check(Check("seccomp_artifact_sha256", True, artifact.proof_detail()))
    if not plan.sidecar.embedded:
        run.sidecar_endpoint = plan.sidecar.endpoint
        run.add_check(Check("sidecar_ready", True, f"external sidecar answered at {plan.sidecar.endpoint} before launch"))
    return run


def abandon_run(run: RunRecord) -> None:
    """Nothing was started (bad policy, unreadable key): leave no run dir behind."""
    run.log.close()
    if run.socket_dir is not None:
        statedir.remove_tree(run.socket_dir)
    statedir.remove_run_dir(run.dirs, keep_log_as=None)


def startup_done() -> None:
    """The agent runs: when the `firma` entry point disabled garbage collection for start-up,
    keep the start-up heap (modules, plan) out of future collections and collect again, since
    the services now run as long as the agent does."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def seccomp_for(plan: RunPlan, host: Host, backend: Any):
    """Compile/verify the managed filter on Linux (the hardening list always applies).
    Returns the artifact or None when this host has no seccomp (non-Linux)."""
    if not host.is_linux:
        return None
    from ..seccomp import store as seccomp  # noqa: PLC0415 - Linux only

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


_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def sidecar_listen(run: RunRecord) -> str:
    """The embedded sidecar listens on a unix socket in a 0700 directory: only this launcher's
    bridge can reach it. On host loopback TCP any local process could submit requests with forged
    attribution headers and write them into the signed audit."""
    path = os.path.join(run.dirs.run_dir, "sidecar.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        import tempfile  # noqa: PLC0415 - rare path; tempfile costs a launch ~2 ms

        run.socket_dir = tempfile.mkdtemp(prefix="firma-sidecar-")  # 0700, short path
        path = os.path.join(run.socket_dir, "sidecar.sock")
    return f"unix://{path}"

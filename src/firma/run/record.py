"""A run's record: its directory, the checks measured during the launch and the proof written
from them (at launch and at teardown)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from .. import privfs
from ..core import proofdoc
from ..core.model import DEFAULT_INVARIANTS, Check, EnforcementProof, ExecutionEnvelope, RunPlan
from ..core.record import field, record
from . import state as statedir
from .log import RunLog, now

if TYPE_CHECKING:
    from ..seccomp.store import SeccompArtifact


@record(frozen=False)
class RunRecord:
    plan: RunPlan
    proof: EnforcementProof
    dirs: statedir.RunDirs
    log: RunLog
    checks: list[Check] = field(default_factory=list)
    sidecar_endpoint: str | None = None
    socket_dir: str | None = None  # private short dir holding the sidecar socket, when used
    started_at: str = field(default_factory=now)
    proof_path: str | None = None
    workspace_findings: list[dict[str, str]] | None = None  # the post-run check's, once it ran

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
            ended_at=now() if ended else None,
            exit_status=exit_status,
            workspace_findings=self.workspace_findings,
        )
        text = proofdoc.dumps(doc)
        path = self.dirs.proof_path(self.plan.identity.sandbox_id)
        privfs.write_private(path, text)
        self.proof_path = path
        if self.plan.proof_file:
            privfs.write_private(self.plan.proof_file, text)

    def finish(self, envelope: ExecutionEnvelope | None, status: int | None, *, failed: bool) -> None:
        """The last steps of every teardown: the private socket dir, the final proof, the run
        dir (a failed run keeps its run.log next to the proof)."""
        if self.socket_dir is not None:
            privfs.remove_tree(self.socket_dir)
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


def open_run(plan: RunPlan, proof: EnforcementProof, log: RunLog, artifact: SeccompArtifact | None) -> RunRecord:
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
        privfs.remove_tree(run.socket_dir)
    statedir.remove_run_dir(run.dirs, keep_log_as=None)


_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def sidecar_listen(run: RunRecord) -> str:
    """The embedded sidecar listens on a unix socket in a 0700 directory: only this launcher's
    bridge can reach it. On host loopback TCP any local process could submit requests with forged
    attribution headers and write them into the signed audit."""
    path = run.dirs.sidecar_socket
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        import tempfile  # noqa: PLC0415 - rare path; tempfile costs a launch ~2 ms

        run.socket_dir = tempfile.mkdtemp(prefix="firma-sidecar-")  # 0700, short path
        path = os.path.join(run.socket_dir, statedir.SIDECAR_SOCKET)
    return f"unix://{path}"

"""A run's record: its directory, the checks measured during the launch and the proof written
from them (at launch and at teardown)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from .. import privfs
from ..core import proofdoc, runsummary
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
    started_at: str = field(default_factory=now)
    proof_path: str | None = None
    policy_sha256: str | None = None  # hashed once, at the launch's first proof
    # --proof-file's and --summary-json's directories, resolved before the agent runs
    proof_pin: privfs.PinnedDir | None = None
    summary_pin: privfs.PinnedDir | None = None
    output_error: str | None = None  # a user-named file that could not be written where it was meant to
    audit_offset: int = 0  # the shared audit log's size when the run opened: its lines start there
    summary: runsummary.RunSummary | None = None  # once the agent has exited
    workspace_findings: list[dict[str, str]] | None = None  # the post-run check's, once it ran
    limit_notes: tuple[str, ...] = ()  # the resource limits the run hit (from the child, at teardown)
    notes: list[str] = field(default_factory=list)  # other lines for the run summary (--timeout)

    def add_check(self, check: Check) -> None:
        self.checks.append(check)
        self.log(f"check {check.name} ok={str(check.ok).lower()} {check.detail}", "info" if check.ok else "error")

    def _policy_sha256(self) -> str | None:
        if self.plan.policy_path is None:
            return None
        if self.policy_sha256 is None:
            from ..configfiles import file_sha256  # noqa: PLC0415 - only with a Cedar policy

            self.policy_sha256 = file_sha256(self.plan.policy_path) or None
        return self.policy_sha256

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
            facts=proofdoc.run_facts(self.plan, policy_sha256=self._policy_sha256()),
            workspace_findings=self.workspace_findings,
        )
        if self.summary is not None:
            doc["denied"] = self.summary.denied_total
            doc["summary"] = self.summary.as_json()
        text = proofdoc.dumps(doc)
        path = self.dirs.proof_path(self.plan.identity.sandbox_id)
        privfs.write_private(path, text)
        self.proof_path = path
        if self.plan.proof_file and self.proof_pin is not None and self.output_error is None:
            self.output_error = write_output(self.proof_pin, self.plan.proof_file, text, "--proof-file", path)

    def finish(self, envelope: ExecutionEnvelope | None, status: int | None, *, failed: bool) -> None:
        """The last steps of every teardown: the private socket dir, the final proof, the run
        dir (a failed run keeps its run.log next to the proof)."""
        invariants = envelope.invariants if envelope is not None else DEFAULT_INVARIANTS
        if status is not None and envelope is not None:
            from . import summary  # noqa: PLC0415 - only once an agent ran

            self.summary = summary.collect(
                self.plan.state_root, self.audit_offset, sandbox_id=self.plan.identity.sandbox_id,
                exit_status=status, proof_path=self.dirs.proof_path(self.plan.identity.sandbox_id),
                monitor=self.plan.monitor,
                notes=tuple(self.notes) + self.limit_notes
                + tuple(f"warning: {w.detail}" for w in self.plan.weakenings if w.setting == "allow_hosts")
                + ((f"workspace check: {len(self.workspace_findings)} finding(s), listed above",)
                   if self.workspace_findings else ()),
            )
        try:
            self.write_proof(invariants, ended=True, exit_status=status)
            self.log(f"proof written to {self.proof_path}", "info")
        except OSError as exc:
            self.log(f"teardown: cannot write proof: {exc}", "error")
        pruned = statedir.prune_proofs(self.dirs.proofs_dir, self.plan.keep_proofs)
        if pruned:
            self.log(f"pruned {len(pruned)} old proofs ([state].keep_proofs = {self.plan.keep_proofs})", "info")
        if not self.plan.keep_markers:
            keep = None
            if failed:
                keep = os.path.join(self.dirs.proofs_dir, f"{self.plan.identity.sandbox_id}.run.log")
            statedir.remove_run_dir(self.dirs, keep_log_as=keep)


def agent_writable(plan: RunPlan) -> tuple[str, ...]:
    """Host directories the agent can write: the workspace, read-write mounts, writable home paths
    (an earlier run could have planted a link anywhere in them)."""
    return (plan.cwd, *(m.source for m in plan.mounts if not m.read_only),
            *(os.path.join(plan.home, rel) for rel in plan.writable_home_paths))


def pin_output(path: str | None, plan: RunPlan) -> privfs.PinnedDir | None:
    """A user-named output file's directory, resolved before the agent runs (DESIGN §14): no
    symlink on the way inside a place the agent can write, ancestors private. The write later
    walks to exactly this directory, never following a link."""
    if path is None:
        return None
    for root in agent_writable(plan):
        privfs.refuse_links_within(path, root)
    return privfs.pin_dir_of(path)


def write_output(pinned: privfs.PinnedDir, path: str, text: str, what: str, kept: str | None) -> str | None:
    """Write a user-named output through its pinned directory; the one-line reason when it could
    not be written there (nothing is written anywhere else)."""
    try:
        privfs.write_private_pinned(pinned, os.path.basename(path), text)
    except (OSError, privfs.PrivatePathError) as exc:
        where = f"; it is kept at {kept}" if kept else ""
        return f"{what} {path} not written: {exc}{where}"
    return None


def open_run(plan: RunPlan, proof: EnforcementProof, log: RunLog, artifact: SeccompArtifact | None) -> RunRecord:
    """The run's directory and record, once the gates passed: run.log joins firma's log, stale
    run dirs of dead launchers are swept, the seccomp artifact is recorded."""
    # checked before anything of the run exists: a refused output path leaves nothing behind
    proof_pin, summary_pin = pin_output(plan.proof_file, plan), pin_output(plan.summary_json, plan)
    dirs = statedir.create(plan.state_root, plan.identity.sandbox_id)
    from .summary import audit_size  # noqa: PLC0415 - tiny; kept next to its reader

    run = RunRecord(plan=plan, proof=proof, dirs=dirs, log=log, audit_offset=audit_size(plan.state_root),
                    proof_pin=proof_pin, summary_pin=summary_pin)
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
    statedir.remove_run_dir(run.dirs, keep_log_as=None)


def sidecar_listen(run: RunRecord) -> str:
    """The embedded sidecar listens on a unix socket in the run's 0700 directory, whatever the
    path's length (a long one is bound and reached through its directory's descriptor:
    services.listen.short_unix_path), and serves only this launcher's uid (SO_PEERCRED). On host
    loopback TCP, or in a shorter shared directory, another process — the agent, if $TMPDIR is
    visible inside — could submit requests with forged attribution into the signed audit."""
    return f"unix://{run.dirs.sidecar_socket}"

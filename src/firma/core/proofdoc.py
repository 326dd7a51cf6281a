"""The proof document (DESIGN §4): what confined one run and what was verified at launch. Pure."""

from __future__ import annotations

import json
from typing import Any, Iterable

from .model import Check, EnforcementProof, Identity, Invariant, RunPlan

PROOF_VERSION = 1


def enforced(proof: EnforcementProof, *, monitor: bool = False) -> bool:
    """Egress is mandatorily confined only by a structural, fail-closed backend, and never in
    monitor mode (denials are logged but the traffic passes)."""
    return proof.structural and proof.fail_closed and not monitor


def run_facts(plan: RunPlan, *, policy_sha256: str | None) -> dict[str, Any]:
    """What the proof says about the run itself, so it can be matched to one: the command, the
    workspace, the allow list, the policy, the config files with their trust state, and every
    weakened default with where it came from."""
    return {
        "mode": "monitor" if plan.monitor else "enforce",
        "command": list(plan.argv),
        "cwd": plan.cwd,
        "allow_hosts": list(plan.allow_hosts),
        "policy": {"path": plan.policy_path, "sha256": policy_sha256} if plan.policy_path else None,
        "config": [s.as_json() for s in plan.config_sources],
        # names only: a value may be a secret (the weakenings name the risky ones)
        "env_names": sorted(plan.base_env),
        "mounts": [{"source": m.source, "target": m.target, "read_only": m.read_only} for m in plan.mounts],
        "workspace_read_only": plan.workspace_read_only,
        "timeout_secs": plan.timeout_secs,
        "publish": [{"bind": p.bind, "host_port": p.host_port, "port": p.port} for p in plan.publish],
        # which destinations are terminated and which credentials brokered: names, never values
        "inspection": plan.inspection.describe() if plan.inspection is not None else None,
        "weakenings": [{"setting": w.setting, "detail": w.detail, "source": w.source} for w in plan.weakenings],
    }


def build(
    *,
    identity: Identity,
    proof: EnforcementProof,
    invariants: Iterable[Invariant],
    checks: Iterable[Check],
    sidecar_endpoint: str | None,
    sidecar_embedded: bool,
    started_at: str,
    ended_at: str | None,
    exit_status: int | None,
    facts: dict[str, Any] | None = None,
    workspace_findings: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    facts = facts or {}
    return {
        "version": PROOF_VERSION,
        "sandbox_id": identity.sandbox_id,
        "session_id": identity.session_id,
        "profile": identity.profile,
        "backend": proof.backend,
        "structural": proof.structural,
        "fail_closed": proof.fail_closed,
        "network_confinement": proof.network_confinement.value,
        "detail": proof.detail,
        "enforced": enforced(proof, monitor=facts.get("mode") == "monitor"),
        **facts,
        "invariants": [{"name": i.name, "mode": i.mode} for i in invariants],
        # What bounds the run's resources, by which mechanism (DESIGN §5.3).
        "limits": proof.limits.as_json() if proof.limits is not None else None,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "sidecar": {"endpoint": sidecar_endpoint, "embedded": sidecar_embedded},
        "started_at": started_at,
        "ended_at": ended_at,
        "exit_status": exit_status,
        # The post-run workspace check's findings (DESIGN §13a); null until it ran.
        "workspace_findings": workspace_findings,
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"

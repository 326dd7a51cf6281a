"""The proof document (DESIGN §4): what confined one run and what was verified at launch. Pure."""

from __future__ import annotations

import json
from typing import Any, Iterable

from .model import Check, EnforcementProof, Identity, Invariant

PROOF_VERSION = 1


def enforced(proof: EnforcementProof) -> bool:
    """Egress is mandatorily confined only by a structural, fail-closed backend."""
    return proof.structural and proof.fail_closed


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
    workspace_findings: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
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
        "enforced": enforced(proof),
        "invariants": [{"name": i.name, "mode": i.mode} for i in invariants],
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

"""The gates before anything of a run starts (DESIGN §4): the backend's proof, the sidecar."""

from __future__ import annotations

from typing import Callable

from ..core.model import EnforcementProof, RunPlan
from ..errors import GateError, SidecarError


def gate(proof: EnforcementProof, plan: RunPlan, log: Callable[..., None]) -> None:
    """DESIGN §4 gates, in order, before anything starts."""
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


def refuse_without_sidecar(plan: RunPlan) -> None:
    """The embedded sidecar is the only one and --no-autostart forbids it: refuse (DESIGN §4)."""
    if plan.sidecar.embedded and not plan.sidecar.autostart:
        raise SidecarError(
            "no sidecar endpoint given and --no-autostart forbids starting the embedded one; "
            "pass --sidecar tcp://HOST:PORT or unix:///PATH (or FIRMA_SIDECAR_ENDPOINT)"
        )


def unreachable_external(plan: RunPlan, exc: BaseException) -> SidecarError:
    return SidecarError(f"external sidecar {plan.sidecar.endpoint} is unreachable ({exc}); start it or fix --sidecar")


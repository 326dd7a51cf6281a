"""The envelope a backend enforces, built from the plan once the services' addresses are known,
and the managed seccomp filter it carries."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..backends.base import RoutingMode, RoutingPlan
from ..core import launchenv
from ..core.hostfacts import Host
from ..core.model import ExecutionEnvelope, Mount, NetworkEndpoints, RunPlan
from ..core import settings as env_names

if TYPE_CHECKING:
    from ..seccomp.store import SeccompArtifact

DNS_STUB_ENV = env_names.DNS_STUB_ADDR


def seccomp_for(plan: RunPlan, host: Host) -> SeccompArtifact | None:
    """Compile/verify the managed filter on Linux (the hardening list always applies).
    Returns the artifact, or None when this host has no seccomp (non-Linux)."""
    if not host.is_linux:
        return None
    from ..seccomp import store as seccomp  # noqa: PLC0415 - Linux only

    return seccomp.prepare_filter(plan.seccomp_policy, plan.state_root, host.machine, host.python3_path)


def build_envelope(
    plan: RunPlan,
    *,
    proxy_url: str,
    dns_stub_addr: str | None,
    routing: RoutingPlan,
    artifact: SeccompArtifact | None,
    setsid: str | None = None,
) -> ExecutionEnvelope:
    """The envelope for `plan`; `artifact` is the managed seccomp filter from `seccomp_for`
    (its exec gate, if any, prefixes the command)."""
    extra = {}
    if routing.export_dns_stub_env and dns_stub_addr:
        extra[DNS_STUB_ENV] = dns_stub_addr
    env = launchenv.with_proxy(plan.base_env, proxy_url, extra=extra)
    prefix = tuple(artifact.command_prefix) if artifact is not None else ()
    if plan.terminal and routing.mode is RoutingMode.PLANTED and setsid is not None:
        # setsid -c makes the agent's pty its controlling terminal, then execs (the exec gate, if any)
        prefix = (setsid, "-c") + prefix
    argv = prefix + tuple(plan.argv)
    return ExecutionEnvelope(
        sandbox_id=plan.identity.sandbox_id,
        runtime_dir=plan.runtime_dir,
        executable=argv[0],
        args=argv[1:],
        cwd=plan.cwd,
        env=env,
        identity_mode=plan.identity_mode,
        home=plan.home,
        seccomp_filter_path=artifact.path if artifact is not None else None,
        seccomp_artifact=artifact,
        mounts=plan.mounts + tuple(_writable_home_mounts(plan)),
        mask_home_paths=plan.mask_home_paths,
        mask_paths=plan.mask_paths,
        workspace_read_only=plan.workspace_read_only,
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


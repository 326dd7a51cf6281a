"""`runner` backend (any host): an operator-provided executable enforces the launch contract.

firma validates FIRMA_RUN_RUNNER (DESIGN §6 rules and texts), serves the bridge and DNS stub on host
loopback, writes the contract v1 (no guest section) to `<runtime_dir>/runner/launch.json` and
starts `<runner> --launch-contract <path>` through the shared external launcher. The proof says
`external_runner`: the runner is trusted to enforce the invariants, and `firma conformance` is how
an operator checks that it does."""

from __future__ import annotations

import os

from ..core.contract import build_contract
from ..core.contract_validate import validate_contract
from ..core.model import EnforcementProof, ExecutionEnvelope, NetworkConfinement, RunPlan
from ..core.vzinputs import Inspect, inspect_path
from ..errors import BackendError, ContractError
from ..core.hostfacts import Host
from . import external
from .base import LaunchedChild, LaunchHooks, RoutingMode, RoutingPlan, refuse_unenforceable
from ..core import settings as env_names

RUNNER_ENV = env_names.RUN_RUNNER
DETAIL = "external runner enforces the launch contract invariants"
CONTRACT_SUBDIR = "runner"
CONTRACT_NAME = "launch.json"


def check_runner_path(value: str | None, name: str = RUNNER_ENV, inspect: Inspect = inspect_path) -> str:
    """DESIGN §6 checks and texts for a runner executable (the vz guest rules, with this variable's
    name); returns the path or raises `backend error (runner): <reason>`."""
    if value is None:
        raise _err(f"runner backend requires {name}")
    if not value.startswith("/"):  # the empty string included
        raise _err(f"{name} must be an absolute path: {value}")
    facts = inspect(value)  # one stat, following links: a dangling link is missing
    if facts.kind == "missing":
        raise _err(f"{name} does not exist: {value}")
    if facts.kind == "error":
        raise _err(f"failed to inspect {name} {value}: {facts.error}")
    if facts.kind != "file":
        raise _err(f"{name} must point to a file: {value}")
    if not facts.executable:
        raise _err(f"{name} must be executable: {value}")
    return value


def _err(reason: str) -> BackendError:
    return BackendError("runner", reason)


class RunnerBackend:
    name = "runner"

    def __init__(self) -> None:
        self._runner: str | None = None

    def prepare(self, plan: RunPlan, host: Host) -> EnforcementProof:
        limit_plan = refuse_unenforceable(plan, "runner")
        self._runner = check_runner_path(plan.runner_path)
        return EnforcementProof(
            backend="runner",
            structural=True,
            fail_closed=True,
            network_confinement=NetworkConfinement.EXTERNAL_RUNNER,
            detail=DETAIL,
            limits=limit_plan,
        )

    def routing(self) -> RoutingPlan:
        return RoutingPlan(mode=RoutingMode.HOST_LOOPBACK, dns_stub=True)

    def contract_path(self, envelope: ExecutionEnvelope) -> str:
        return os.path.join(envelope.runtime_dir, CONTRACT_SUBDIR, CONTRACT_NAME)

    async def launch(self, envelope: ExecutionEnvelope, hooks: LaunchHooks) -> LaunchedChild:
        if self._runner is None:
            raise _err("launch called before prepare")
        for key in ("proxy_url", "dns_stub_addr"):
            value = getattr(envelope.network, key)
            if value is None or not str(value).strip():
                # The ref text, worded for this backend: the host services were not started.
                raise _err(
                    f"runner launch requires {key} from network runtime; sidecar bridge was not prepared"
                )
        try:
            contract = build_contract(envelope, self._runner)
        except ContractError as exc:
            raise _err(str(exc)) from exc
        # Check our own output against the runner-side rules before a runner ever sees it: a
        # contract the runner would reject is a firma bug, and says so before anything starts.
        problems = validate_contract(contract)
        if problems:
            raise _err(f"generated launch contract is invalid: {problems[0]}")
        return await external.launch_contract(
            backend=self.name,
            runner_path=self._runner,
            contract=contract,
            contract_path=self.contract_path(envelope),
            hooks=hooks,
        )

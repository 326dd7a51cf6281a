"""`vz` backend (macOS): compatibility, sandbox-exec network-deny, or Virtualization.framework guest.

The mode is chosen once, in `prepare`, from the plan's `VzInputs` (captured from the environment
by the planner; this module never reads `os.environ`): guest wins over network-deny, else
compatibility. Guest inputs are validated there, once, before anything starts.

- compatibility (`proxy_only`, non-structural): `sandbox-exec` with `(allow default)` and the home
  masks; the agent is pointed at the bridge but nothing stops it going around it, so the
  lifecycle's gate demands the explicit opt-in.
- network-deny (`macos_sandbox_network_deny`): the SBPL denies every outbound connection except
  the host bridge and DNS stub ports on loopback.
- guest (`macos_vz_guest`): the launch contract is written privately and
  `<runner> --launch-contract <path>` is started; the runner boots the guest and enforces it.

Both structural modes get the host DNS refusal stub, exported as `FIRMA_DNS_STUB_ADDR`."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from urllib.parse import urlsplit

from ..core.contract import build_contract
from ..core.contract_validate import validate_contract
from ..core.model import (
    Check,
    EnforcementProof,
    ExecutionEnvelope,
    NetworkConfinement,
    RunPlan,
    frozen_map,
)
from ..core.record import record, replace
from ..core.sbpl import SbplInput, parse_port, render_sbpl, sandbox_exec_argv
from ..core.vzinputs import (
    GuestArtifacts,
    Inspect,
    VzMode,
    inspect_path,
    select_mode,
    validate_guest_inputs,
)
from ..errors import BackendError, ContractError
from ..core.hostfacts import Host
from .preflight import vz_host_check
from . import external
from .base import LaunchedChild, LaunchHooks, RoutingMode, RoutingPlan, refuse_unenforceable
from ..core import settings as env_names

DNS_STUB_ENV = env_names.DNS_STUB_ADDR
CONTRACT_SUBDIR = "vz-guest"
CONTRACT_NAME = "vz-guest-launch.json"

# DESIGN §4 table (ref texts).
PROOFS = {
    VzMode.COMPATIBILITY: (
        False,
        NetworkConfinement.PROXY_ONLY,
        "macOS backend active; outbound mediation is currently proxy-based",
    ),
    VzMode.NETWORK_DENY: (
        True,
        NetworkConfinement.MACOS_SANDBOX_NETWORK_DENY,
        "macOS sandbox-exec with deny network-outbound; wrapped process may only reach the Firma "
        "proxy bridge + DNS stub on loopback (port-scoped); all other loopback and external "
        "outbound denied by TrustedBSD MAC policy",
    ),
    VzMode.GUEST: (
        True,
        NetworkConfinement.MACOS_VZ_GUEST,
        "macOS Virtualization.framework guest mode selected; configured runner must boot the "
        "guest with bridge-only egress, deterministic DNS, and fail-closed sidecar reachability "
        "checks",
    ),
}


def proof_for(mode: VzMode) -> EnforcementProof:
    structural, confinement, detail = PROOFS[mode]
    return EnforcementProof(
        backend="vz",
        structural=structural,
        fail_closed=True,
        network_confinement=confinement,
        detail=detail,
    )


def check_sandbox_exec(host: Host) -> str:
    path = host.sandbox_exec_path
    if not path or not os.path.isabs(path) or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise BackendError("vz", "sandbox-exec is not installed or not executable")
    return path


@record
class _Prepared:
    mode: VzMode
    guest: GuestArtifacts | None
    sandbox_exec: str | None


def _required(mode: VzMode, key: str, value: str | None) -> str:
    if value is None or not value.strip():
        what = "VZ guest launch" if mode is VzMode.GUEST else "sandbox-exec launch"
        raise BackendError(
            "vz", f"{what} requires {key} from network runtime; sidecar bridge was not prepared"
        )
    return value


def _loopback_port(mode: VzMode, what: str, value: str | None) -> int:
    value = _required(mode, what, value)
    port = parse_port(value)
    # The profile allows `localhost:<port>` only: a bridge anywhere else would be unreachable
    # (fail closed, but confusingly), so refuse it plainly.
    host = urlsplit(value if "://" in value else f"//{value}").hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BackendError("vz", f"{what} {value} is not on host loopback; refusing to launch")
    return port


class VzBackend:
    name = "vz"

    def __init__(self, inspect: Inspect = inspect_path) -> None:
        # `inspect` is the one filesystem look at the guest inputs (injectable for tests).
        self._inspect = inspect
        self._prepared: _Prepared | None = None

    @property
    def mode(self) -> VzMode:
        return self._need().mode

    def _need(self) -> _Prepared:
        if self._prepared is None:
            raise BackendError("vz", "the backend was used before prepare")
        return self._prepared

    def prepare(self, plan: RunPlan, host: Host) -> EnforcementProof:
        limit_plan = refuse_unenforceable(plan, "vz")
        vz_host_check(host)
        mode = select_mode(plan.vz)  # once per launch; launch() reuses it
        guest = None
        sandbox_exec = None
        if mode is VzMode.GUEST:
            guest = validate_guest_inputs(plan.vz, self._inspect)
        else:
            sandbox_exec = check_sandbox_exec(host)
        self._prepared = _Prepared(mode=mode, guest=guest, sandbox_exec=sandbox_exec)
        return replace(proof_for(mode), limits=limit_plan)

    def routing(self) -> RoutingPlan:
        structural = self._need().mode.structural
        return RoutingPlan(
            mode=RoutingMode.HOST_LOOPBACK, dns_stub=structural, export_dns_stub_env=structural
        )

    def launch_envelope(self, envelope: ExecutionEnvelope) -> ExecutionEnvelope:
        """The envelope as launched: in the structural modes the bridge and the DNS stub must be
        there (ref text), and the agent's environment names the host DNS stub
        (`FIRMA_DNS_STUB_ADDR`), whatever the caller put there."""
        mode = self._need().mode
        if not mode.structural:
            return envelope
        for key in ("proxy_url", "dns_stub_addr"):
            _required(mode, key, getattr(envelope.network, key))
        env = dict(envelope.env)
        env[DNS_STUB_ENV] = envelope.network.dns_stub_addr or ""  # _required refused None above
        return replace(envelope, env=frozen_map(env))

    async def launch(self, envelope: ExecutionEnvelope, hooks: LaunchHooks) -> LaunchedChild:
        prepared = self._need()
        hooks.add_check(Check("vz_mode", True, f"vz mode {prepared.mode.value}, chosen once at prepare"))
        if prepared.mode is VzMode.GUEST:
            return await self._launch_guest(prepared, envelope, hooks)
        return await self._launch_sandbox_exec(prepared, envelope, hooks)

    def contract_path(self, envelope: ExecutionEnvelope) -> str:
        return os.path.join(envelope.runtime_dir, CONTRACT_SUBDIR, CONTRACT_NAME)

    def build_guest_contract(self, envelope: ExecutionEnvelope) -> dict:
        prepared = self._need()
        if prepared.guest is None:
            raise BackendError("vz", "guest contract requested outside guest mode")
        try:
            contract = build_contract(
                self.launch_envelope(envelope), prepared.guest.runner, guest=prepared.guest
            )
        except ContractError as exc:
            raise BackendError("vz", str(exc)) from None
        # Our own output must pass the runner-side rules; if it does not, that is a firma bug
        # and nothing may start.
        problems = validate_contract(contract, file_exists=os.path.isfile)
        if problems:
            raise BackendError("vz", f"generated launch contract is invalid: {problems[0]}")
        return contract

    async def _launch_guest(
        self, prepared: _Prepared, envelope: ExecutionEnvelope, hooks: LaunchHooks
    ) -> LaunchedChild:
        assert prepared.guest is not None
        contract = self.build_guest_contract(envelope)
        return await external.launch_contract(
            backend=self.name,
            runner_path=prepared.guest.runner,
            contract=contract,
            contract_path=self.contract_path(envelope),
            hooks=hooks,
        )

    def sbpl_profile(self, envelope: ExecutionEnvelope) -> str:
        prepared = self._need()
        network_deny = prepared.mode is VzMode.NETWORK_DENY
        proxy_port = _loopback_port(prepared.mode, "proxy_url", envelope.network.proxy_url)
        ports: tuple[int, ...] = ()
        if network_deny:
            ports = (
                proxy_port,
                _loopback_port(prepared.mode, "dns_stub_addr", envelope.network.dns_stub_addr),
            )
        return render_sbpl(
            SbplInput(
                network_deny=network_deny,
                loopback_ports=ports,
                home=envelope.home,
                mask_home_paths=envelope.mask_home_paths,
            )
        )

    async def _launch_sandbox_exec(
        self, prepared: _Prepared, envelope: ExecutionEnvelope, hooks: LaunchHooks
    ) -> LaunchedChild:
        assert prepared.sandbox_exec is not None
        envelope = self.launch_envelope(envelope)
        profile = self.sbpl_profile(envelope)
        digest = hashlib.sha256(profile.encode("utf-8")).hexdigest()
        hooks.add_check(
            Check(
                "sbpl_profile",
                True,
                f"{prepared.mode.value} profile, {profile.count(chr(10))} lines, sha256 {digest}",
            )
        )
        if prepared.mode.structural:
            hooks.add_check(
                Check("dns_stub_env", True, f"{DNS_STUB_ENV}={envelope.env[DNS_STUB_ENV]}")
            )
        hooks.log(f"vz: sandbox-exec {prepared.mode.value} profile sha256 {digest}")
        argv = sandbox_exec_argv(
            prepared.sandbox_exec, profile, envelope.executable, envelope.args
        )
        return await external.spawn_group(argv, env=envelope.env, cwd=envelope.cwd)

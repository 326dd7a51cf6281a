"""Plain data shared by every layer: the launch plan, the execution envelope and the proof.

Pure: no I/O, no environment reads. Everything is frozen so a plan, once resolved, cannot drift
between the gate that checked it and the backend that enforces it."""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from . import wire
from .limits import LimitPlan, LimitRequest
from .statelayout import run_dir_path
from .record import record, field

if TYPE_CHECKING:
    from .inspectplan import InspectionPlan

BACKENDS = ("bwrap", "vz", "runner")

# Inside a bwrap sandbox the agent sees exactly these planted endpoints.
PLANTED_PROXY_ADDR = ("127.0.0.1", 18080)
PLANTED_DNS_ADDR = ("127.0.0.1", 53)


def frozen_map(m: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted((m or {}).items())))


class NetworkConfinement(StrEnum):
    LINUX_NETWORK_NAMESPACE = "linux_network_namespace"
    MACOS_SANDBOX_NETWORK_DENY = "macos_sandbox_network_deny"
    MACOS_VZ_GUEST = "macos_vz_guest"
    EXTERNAL_RUNNER = "external_runner"
    PROXY_ONLY = "proxy_only"


class IdentityMode(StrEnum):
    SANDBOX_USER = "sandbox-user"
    HOST_USER = "host-user"

    @property
    def contract_name(self) -> str:
        """Spelling used in the launch contract: `sandbox_user` | `host_user`."""
        return self.value.replace("-", "_")


@record
class Mount:
    source: str  # absolute host path
    target: str  # absolute path inside the sandbox
    read_only: bool = False
    # firma writes the source into the run's private dir after the gates (the CA bundle): it
    # does not exist at prepare, and bwrap refuses to build if it is missing then.
    generated: bool = False


@record
class Weakening:
    """A setting that loosens a default, and where it came from (for the proof)."""

    setting: str
    detail: str
    source: str


@record
class SeccompPolicyRef:
    source_policy_path: str
    artifact_dir: str


@record
class VzInputs:
    """The macOS flags and guest inputs, captured once from the environment by the planner."""

    guest: bool = False  # FIRMA_RUN_VZ_GUEST truthy
    structural_network: bool = False  # FIRMA_RUN_VZ_STRUCTURAL_NETWORK truthy
    runner: str | None = None  # raw FIRMA_RUN_VZ_GUEST_RUNNER (None = unset)
    kernel: str | None = None
    initrd: str | None = None
    rootfs: str | None = None


@record
class SidecarTls:
    """Client authentication to an external sidecar (`[run].sidecar_tls`): the certificate and key
    the bridge presents, and the CA that signed the sidecar's certificate."""

    cert: str
    key: str
    ca: str


@record
class SidecarChoice:
    """`local` = embedded sidecar in the launcher; otherwise an endpoint tcp://H:P | unix:///P."""

    endpoint: str = "local"
    autostart: bool = True
    startup_timeout_secs: float = 10.0
    tls: SidecarTls | None = None  # mutual TLS to an external tcp:// sidecar

    @property
    def embedded(self) -> bool:
        return self.endpoint == "local"


@record
class Identity:
    sandbox_id: str  # sbx_<uuid7 hex>
    session_id: str
    profile: str
    agent_id: str
    user: str  # x-firma-user

    def attribution_headers(self) -> Mapping[str, str]:
        """Trusted attribution headers (ref names), sorted by name."""
        return frozen_map(
            wire.attribution_headers(
                sandbox_id=self.sandbox_id, session_id=self.session_id, profile=self.profile,
                agent_id=self.agent_id, user=self.user,
            )
        )


@record
class RunPlan:
    """Everything one `firma run` needs, resolved from CLI + firma.toml + profile + environment."""

    identity: Identity
    backend: str
    argv: tuple[str, ...]
    cwd: str  # absolute workspace, mounted read-write
    home: str
    state_root: str
    identity_mode: IdentityMode = IdentityMode.SANDBOX_USER
    # Launch environment built from empty (DESIGN §11) *without* the proxy variables, which depend
    # on where the bridge ends up (planted 127.0.0.1:18080 or a host-loopback ephemeral port).
    base_env: Mapping[str, str] = field(default_factory=frozen_map)
    allow_hosts: tuple[str, ...] = ()
    allow_tcp: tuple[str, ...] = ()  # opaque TCP destinations, exact HOST:PORT
    policy_path: str | None = None
    seccomp_policy: SeccompPolicyRef | None = None
    mounts: tuple[Mount, ...] = ()
    mask_home_paths: tuple[str, ...] = ()  # relative to home
    mask_paths: tuple[str, ...] = ()  # absolute, `[run].mask_paths` ("~/" expanded)
    writable_home_paths: tuple[str, ...] = ()  # relative to home, bound read-write when present
    sidecar: SidecarChoice = field(default_factory=SidecarChoice)
    allow_non_structural: bool = False
    monitor: bool = False
    proof_file: str | None = None
    keep_markers: bool = False
    vz: VzInputs = field(default_factory=VzInputs)
    runner_path: str | None = None  # raw FIRMA_RUN_RUNNER (None = unset)
    config_path: str | None = None  # the highest-precedence config file
    config_paths: tuple[str, ...] = ()  # every config file read (protected when in the workspace)
    config_sources: tuple[Any, ...] = ()  # configtrust.ConfigSource of every file considered
    weakenings: tuple[Weakening, ...] = ()  # every loosened default, with its source
    keep_proofs: int = 1000  # `[state].keep_proofs`: older proofs are pruned at teardown
    audit_bounds: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # trusted `[audit]` keys
    allow_notes: tuple[str, ...] = ()  # URL-form allow patterns rewritten (for the launch line)
    limits: LimitRequest = field(default_factory=LimitRequest)  # --memory/--pids/--cpus, [run].limits
    workspace_read_only: bool = False  # --read-only (bwrap only)
    timeout_secs: float | None = None  # --timeout: wall clock; SIGTERM, then SIGKILL; exit 124
    publish: tuple[Publish, ...] = ()  # --publish (bwrap, embedded sidecar)
    terminal: bool = False  # the agent gets a pty of its own, relayed by the launcher (bwrap; DESIGN §12a)
    caches: tuple[str, ...] = ()  # [run].caches / --cache: tool caches kept per workspace (their mounts are in `mounts`)
    quiet: bool = False  # --quiet: no run summary on stderr
    summary_json: str | None = None  # --summary-json FILE
    # Extra workspace-relative paths bound read-only (besides the built-in list), `[run].protected_paths`.
    protected_paths: tuple[str, ...] = ()
    # What a finding of the post-run workspace check does to the exit status (DESIGN §13a).
    on_workspace_findings: str = "fail"
    inspection: InspectionPlan | None = None  # HTTPS inspection and credentials (DESIGN §5.7)

    @property
    def runtime_dir(self) -> str:
        return run_dir_path(self.state_root, self.identity.sandbox_id)


@record
class EnforcementProof:
    backend: str
    structural: bool
    fail_closed: bool
    network_confinement: NetworkConfinement
    detail: str
    limits: LimitPlan | None = None  # the resource limits and what enforces each (DESIGN §5.3)


@record
class Publish:
    """`--publish`: the agent's `port` inside, reachable at `bind`:`host_port` on the host."""

    bind: str
    host_port: int
    port: int

    @property
    def loopback(self) -> bool:
        return self.bind in ("127.0.0.1", "::1", "localhost") or self.bind.startswith("127.")


@record
class Check:
    """One launch-time verification recorded in the proof document."""

    name: str
    ok: bool
    detail: str


INVARIANT_NAMES = (
    "sidecar_only_egress",
    "dns_confined",
    "fail_closed_startup",
    "fail_closed_runtime",
    "direct_bypass_resistant",
    "preserve_stdio_signals_exit",
)


@record
class Invariant:
    name: str
    mode: str = "required"  # or "disabled_by_policy" (only fail_closed_startup)


DEFAULT_INVARIANTS = tuple(Invariant(n) for n in INVARIANT_NAMES)


@record
class NetworkEndpoints:
    proxy_url: str | None  # e.g. http://127.0.0.1:18080
    dns_stub_addr: str | None  # e.g. 127.0.0.1:53
    attribution_headers: Mapping[str, str] = field(default_factory=frozen_map)


@record
class SeccompArtifactRef:
    """firma's stored seccomp artifact as a backend opens it (firma.seccomp.store.open_verified):
    every directory from `root` down through policy_id/policy_version/arch is checked, the
    metadata file must equal `metadata` and the BPF at `path` must hash to `sha256`."""

    path: str
    sha256: str
    root: str
    policy_id: str
    policy_version: str
    arch: str
    metadata_path: str
    metadata: bytes


@record
class ExecutionEnvelope:
    """What a backend must enforce: pure data, built by the launch sequence after routing."""

    sandbox_id: str
    runtime_dir: str
    executable: str
    args: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]  # final launch environment (proxy variables included), no secrets
    identity_mode: IdentityMode
    home: str
    seccomp_filter_path: str | None
    mounts: tuple[Mount, ...]
    mask_home_paths: tuple[str, ...]
    network: NetworkEndpoints
    mask_paths: tuple[str, ...] = ()  # absolute; only the bwrap backend enforces them
    workspace_read_only: bool = False  # --read-only; only the bwrap backend enforces it
    invariants: tuple[Invariant, ...] = DEFAULT_INVARIANTS
    # firma's own artifact for seccomp_filter_path, verified when opened; None for a bare path
    # (a runner enforcing a contract), which gets the owner and mode checks only.
    seccomp_artifact: SeccompArtifactRef | None = None

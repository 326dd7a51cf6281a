"""CLI arguments + firma.toml + profile + captured environment → RunPlan. Pure."""

from __future__ import annotations

import posixpath
import re
from typing import Any, Callable, Mapping

from ..errors import ConfigError, PlanError, UnsupportedBackendError
from .hostfacts import Host
from . import settings as env_names
from .settings import is_truthy, state_root
from . import config as cfgmod
from . import launchenv, profiles
from .endpoint import validate_endpoint
from .identity import build_identity
from .model import BACKENDS, IdentityMode, RunPlan, SidecarChoice
from .mountcheck import check_mounts
from .record import record
from .vzinputs import vz_inputs_from_environ

RESERVED_SANDBOX_ID = env_names.RUN_SANDBOX_ID
_SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)


@record
class RunArgs:
    """`firma run` options exactly as given on the command line (None = not given)."""

    command: tuple[str, ...]
    profile: str | None = None
    backend: str | None = None
    identity_mode: str | None = None
    preserve_host_user: bool = False
    allow_hosts: tuple[str, ...] = ()
    policy: str | None = None
    sidecar: str | None = None
    no_autostart: bool = False
    startup_timeout_secs: float | None = None
    allow_non_structural: bool = False
    proof_file: str | None = None
    monitor: bool = False


def default_backend(host: Host) -> str:
    return "vz" if host.is_macos else "bwrap"


def parse_identity_mode(value: str) -> IdentityMode:
    v = value.strip().replace("_", "-")
    try:
        return IdentityMode(v)
    except ValueError:
        raise ConfigError(
            f"unknown identity mode '{value}'; expected sandbox-user or host-user"
        ) from None


# Directories that are never a workspace: the agent could write the system or a user's tools there.
# Their subdirectories can be (a checkout under /srv or /opt is a workspace like any other), except
# under the kernel's own filesystems.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin",
    "/usr/lib", "/usr/local", "/usr/local/bin", "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/tmp",
})
KERNEL_TREES = ("/proc", "/sys", "/dev")


def refuse_workspace(cwd: str, home: str, realpath: Callable[[str], str]) -> None:
    """The working directory becomes the writable workspace: never $HOME or one of its ancestors
    (the agent could then write ~/.local/bin, ~/.config/autostart, shell rc files), `/` or a
    system directory. PlanError names the fix."""
    ws = posixpath.normpath(realpath(cwd))
    fix = "cd into a project directory (or a new empty one) and run firma there"
    if ws in SYSTEM_DIRS or any(_inside(ws, k) for k in KERNEL_TREES):
        raise PlanError(f"refusing {ws} as the workspace: the agent could write a system directory; {fix}")
    for h in dict.fromkeys((posixpath.normpath(home), posixpath.normpath(realpath(home)))):
        if h != "/" and _inside(h, ws):
            what = "your home directory" if ws == h else f"an ancestor of your home directory {h}"
            raise PlanError(
                f"refusing {ws} as the workspace: it is {what}, and the agent could write your "
                f"tools' configuration and startup files there; {fix}"
            )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def build_plan(
    args: RunArgs,
    cfg: cfgmod.ConfigFile,
    host: Host,
    *,
    cwd: str,
    unix_ms: int,
    rand: bytes,
    realpath: Callable[[str], str] = lambda p: p,
) -> RunPlan:
    """`realpath` resolves symlinks of mount sources (the CLI passes os.path.realpath)."""
    env = host.environ
    if RESERVED_SANDBOX_ID in env:
        raise PlanError(
            "FIRMA_RUN_SANDBOX_ID is reserved for internal child propagation; unset it"
        )
    if not args.command or not args.command[0]:
        raise PlanError("no command given; usage: firma run [options] -- CMD [ARGS...]")
    cwd = posixpath.normpath(cwd)
    if not cwd.startswith("/"):
        raise PlanError(f"working directory must be absolute: {cwd}")

    profile = profiles.resolve(
        profiles.choose_profile_name(args.profile, cfg.profile, args.command[0])
    )
    cli_layer: dict[str, Any] = {}
    if args.backend is not None:
        cli_layer["backend"] = args.backend
    if args.identity_mode is not None:
        cli_layer["identity_mode"] = args.identity_mode
    if args.preserve_host_user:
        cli_layer["identity_mode"] = IdentityMode.HOST_USER.value
    if args.policy is not None:
        cli_layer["policy"] = posixpath.normpath(posixpath.join(cwd, args.policy))
    settings = cfgmod.effective(profile, cfg, cli_layer)
    # --allow-host adds to whatever the layers resolved to.
    allow_hosts = tuple(dict.fromkeys(tuple(settings.get("allow_hosts", ())) + args.allow_hosts))

    backend = settings.get("backend") or default_backend(host)
    if backend not in BACKENDS:
        raise UnsupportedBackendError.unknown(backend)
    identity_mode = parse_identity_mode(settings.get("identity_mode", "sandbox-user"))

    identity = build_identity(
        environ=env,
        profile=profile.name,
        agent_id=settings.get("agent_id"),
        unix_ms=unix_ms,
        rand=rand,
    )
    home = posixpath.normpath(env.get("HOME", "").strip() or ("/root" if host.is_root else "/"))
    refuse_workspace(cwd, home, realpath)
    root = state_root(env, host.uid)
    if _inside(root, cwd):
        raise PlanError(
            f"state root {root} is inside the workspace {cwd}; it would be visible to the agent; "
            "set FIRMA_STATE_DIR to a directory outside the workspace"
        )
    for p in settings.get("mask_home_paths", ()):
        if p.startswith("/") or ".." in p.split("/"):
            raise ConfigError(f"mask_home_paths entries must be relative to $HOME: {p}")
    check_mounts(settings.get("mounts", ()), state_root=root, realpath=realpath)

    endpoint = args.sidecar or env.get(env_names.SIDECAR_ENDPOINT, "").strip() or settings.get(
        "sidecar_endpoint"
    ) or "local"
    timeout = args.startup_timeout_secs if args.startup_timeout_secs is not None else 10.0
    if not timeout > 0:
        raise ConfigError("--sidecar-startup-timeout-secs must be positive")

    base = launchenv.base_env(
        host_environ=env,
        passthrough=tuple(settings.get("env_passthrough", ())),
        env_set=settings.get("env_set", {}),
        identity=identity,
        identity_mode=identity_mode,
    )
    return RunPlan(
        identity=identity,
        backend=backend,
        argv=tuple(args.command),
        cwd=cwd,
        home=home,
        state_root=root,
        identity_mode=identity_mode,
        base_env=base,
        allow_hosts=allow_hosts,
        policy_path=settings.get("policy"),
        seccomp_policy=settings.get("seccomp_policy"),
        mounts=tuple(settings.get("mounts", ())),
        mask_home_paths=tuple(settings.get("mask_home_paths", ())),
        writable_home_paths=tuple(settings.get("writable_home_paths", ())),
        sidecar=SidecarChoice(
            endpoint=validate_endpoint(endpoint),
            autostart=not args.no_autostart,
            startup_timeout_secs=float(timeout),
        ),
        allow_non_structural=bool(
            args.allow_non_structural
            or settings.get("allow_non_structural", False)
            or is_truthy(env.get(env_names.RUN_ALLOW_NON_STRUCTURAL))
        ),
        monitor=args.monitor,
        proof_file=(
            posixpath.normpath(posixpath.join(cwd, args.proof_file)) if args.proof_file else None
        ),
        keep_markers=bool(env.get(env_names.RUN_KEEP_MARKERS, "").strip()),
        vz=vz_inputs_from_environ(env),
        runner_path=env.get(env_names.RUN_RUNNER),
        config_path=cfg.path,
        protected_paths=tuple(settings.get("protected_paths", ())),
        on_workspace_findings=settings.get("on_workspace_findings", "fail"),
    )


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if _SECRETISH.search(k) and v else v) for k, v in env.items()}


def plan_to_json(plan: RunPlan) -> dict[str, Any]:
    """The resolved plan for `--print-effective-config` (secret-looking values redacted)."""
    return {
        "config_path": plan.config_path,
        "backend": plan.backend,
        "profile": plan.identity.profile,
        "agent_id": plan.identity.agent_id,
        "sandbox_id": plan.identity.sandbox_id,
        "session_id": plan.identity.session_id,
        "user": plan.identity.user,
        "identity_mode": plan.identity_mode.value,
        "command": list(plan.argv),
        "cwd": plan.cwd,
        "home": plan.home,
        "state_root": plan.state_root,
        "env": redact_env(plan.base_env),
        "allow_hosts": list(plan.allow_hosts),
        "policy": plan.policy_path,
        "seccomp_policy": (
            None
            if plan.seccomp_policy is None
            else {
                "source_policy_path": plan.seccomp_policy.source_policy_path,
                "artifact_dir": plan.seccomp_policy.artifact_dir,
            }
        ),
        "mounts": [
            {"source": m.source, "target": m.target, "read_only": m.read_only} for m in plan.mounts
        ],
        "mask_home_paths": list(plan.mask_home_paths),
        "protected_paths": list(plan.protected_paths),
        "writable_home_paths": list(plan.writable_home_paths),
        "on_workspace_findings": plan.on_workspace_findings,
        "sidecar": {
            "endpoint": plan.sidecar.endpoint,
            "embedded": plan.sidecar.embedded,
            "autostart": plan.sidecar.autostart,
            "startup_timeout_secs": plan.sidecar.startup_timeout_secs,
        },
        "allow_non_structural": plan.allow_non_structural,
        "monitor": plan.monitor,
        "proof_file": plan.proof_file,
    }

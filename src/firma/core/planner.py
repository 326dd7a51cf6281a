"""CLI arguments + firma.toml + profile + captured environment → RunPlan. Pure."""

from __future__ import annotations

import posixpath
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..errors import ConfigError, PlanError, UnsupportedBackendError
from .hostfacts import Host
from . import settings as env_names
from .settings import is_truthy, state_root, user_config_dir
from . import config as cfgmod
from . import launchenv, profiles
from .endpoint import validate_endpoint
from .identity import build_identity
from . import allowlist, caches, limits, runopts
from .inspectplan import JAVA_ENV, plan_inspection
from .model import BACKENDS, IdentityMode, Mount, RunPlan, SidecarChoice, Weakening, frozen_map
from .statelayout import run_dir_path
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
    allow_tcp: tuple[str, ...] = ()
    policy: str | None = None
    sidecar: str | None = None
    no_autostart: bool = False
    startup_timeout_secs: float | None = None
    allow_non_structural: bool = False
    proof_file: str | None = None
    quiet: bool = False
    summary_json: str | None = None
    env: tuple[str, ...] = ()  # --env NAME[=VALUE]
    mount: tuple[str, ...] = ()  # --mount SRC[:DST][:ro|rw]
    allow_write: tuple[str, ...] = ()  # --allow-write PATH
    read_only: bool = False  # --read-only: the workspace is read-only inside
    timeout: str | None = None  # --timeout DURATION
    publish: tuple[str, ...] = ()  # --publish [[BIND:]HOST_PORT:]PORT
    cache: tuple[str, ...] = ()  # --cache NAME (adds to [run].caches)
    no_caches: bool = False  # --no-caches
    terminal: bool = False  # stdin and stdout are terminals and no --no-tty (the CLI looks)
    memory: str | None = None  # --memory SIZE
    pids: int | None = None  # --pids N
    cpus: str | None = None  # --cpus N
    limits_mode: str | None = None  # --limits enforce|best-effort
    inspect: tuple[str, ...] = ()  # --inspect HOST (adds to [run].inspect)
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


def endpoint_of(args: RunArgs, env: Mapping[str, str], settings: Mapping[str, Any]) -> str:
    """The sidecar endpoint: --sidecar, FIRMA_SIDECAR_ENDPOINT, the configuration, else local."""
    return (args.sidecar or env.get(env_names.SIDECAR_ENDPOINT, "").strip() or settings.get("sidecar_endpoint")
            or "local")


def _mask_paths(entries, home: str, cwd: str) -> tuple[str, ...]:
    """`[run].mask_paths`: absolute or `~/`-relative paths hidden inside (an empty tmpfs over a
    directory, /dev/null over a file), after every mount. Never the workspace or a parent of it."""
    out: list[str] = []
    for raw in entries:
        p = posixpath.join(home, raw[2:]) if raw.startswith("~/") else raw
        if not p.startswith("/") or ".." in p.split("/"):
            raise ConfigError(f"mask_paths entries must be absolute or start with ~/ (no ..): {raw}")
        p = posixpath.normpath(p)
        if _inside(cwd, p):
            raise ConfigError(f"mask_paths entry {raw} would hide the workspace {cwd}; mask something inside it")
        out.append(p)
    return tuple(dict.fromkeys(out))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def build_plan(
    args: RunArgs,
    cfg: cfgmod.ConfigSet | cfgmod.ConfigFile,
    host: Host,
    *,
    cwd: str,
    unix_ms: int,
    rand: bytes,
    realpath: Callable[[str], str] = lambda p: p,
) -> RunPlan:
    """`realpath` resolves symlinks of mount sources (the CLI passes os.path.realpath)."""
    if isinstance(cfg, cfgmod.ConfigFile):
        cfg = cfgmod.ConfigSet.single(cfg)
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
    env_names_cli, env_values_cli = runopts.parse_env(args.env)
    if env_values_cli:
        cli_layer["env_set"] = env_values_cli
    settings, sources = cfgmod.effective_with_sources(profile, cfg, cli_layer)
    # --env NAME, --mount and --allow-write add to what the layers resolved to.
    if env_names_cli:
        settings["env_passthrough"] = tuple(dict.fromkeys((*settings.get("env_passthrough", ()), *env_names_cli)))
        sources["env_passthrough"] = "command line"
    cli_mounts = tuple(runopts.parse_mount(m, cwd) for m in args.mount) + tuple(
        Mount(p, p, False) for p in (posixpath.normpath(posixpath.join(cwd, w)) for w in args.allow_write))
    if cli_mounts:
        settings["mounts"] = (*settings.get("mounts", ()), *cli_mounts)
        sources["mounts"] = "command line"
    # --allow-host adds to whatever the layers resolved to.
    checked_allow = allowlist.check(tuple(dict.fromkeys(tuple(settings.get("allow_hosts", ())) + args.allow_hosts)))
    allow_hosts = checked_allow.patterns
    allow_tcp = allowlist.check_opaque(tuple(dict.fromkeys(tuple(settings.get("allow_tcp", ())) + args.allow_tcp)))

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
    # Caches that survive runs (opt-in): their mounts and variables join the configured ones.
    cache_names = () if args.no_caches else caches.check_names(
        (*settings.get("caches", ()), *args.cache), "--cache / [run].caches")
    cache_mounts, cache_env = caches.plan_caches(cache_names, cwd=cwd, environ=env, state_root=root)
    if cache_mounts:
        settings["mounts"] = (*settings.get("mounts", ()), *cache_mounts)
        settings["env_set"] = {**settings.get("env_set", {}), **cache_env}
    # Never a way into firma's own state or the user's config and trust records (DESIGN §14, §15).
    config_dir = user_config_dir(env)
    check_mounts(settings.get("mounts", ()), state_root=root, realpath=realpath,
                 protected=(config_dir,) if config_dir else ())
    mask_paths = _mask_paths(settings.get("mask_paths", ()), home, cwd)
    published = tuple(runopts.parse_publish(p) for p in args.publish)
    if published and endpoint_of(args, env, settings) != "local":
        raise ConfigError("--publish needs the embedded sidecar (it audits each inbound connection); "
                          "drop --sidecar or --publish")
    limit_request = limits.request(
        settings.get("limits", {}),
        {limits.MEMORY: args.memory, limits.PIDS: args.pids, limits.CPUS: args.cpus, limits.MODE: args.limits_mode},
        host.mem_total,
        settings.get(limits.CEILING),
    )

    endpoint = endpoint_of(args, env, settings)
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
    # HTTPS inspection and credentials (DESIGN §5.7): firma's own mounts (from the run directory,
    # so after the mount checks) and variables (the placeholders, the CA bundle's names).
    inspection, inspect_mounts, inspect_env = plan_inspection(
        inspect=tuple(dict.fromkeys((*settings.get("inspect", ()), *args.inspect))),
        no_inspect=tuple(dict.fromkeys(settings.get("no_inspect", ()))),
        credentials=cfg.credentials, policy_path=settings.get("policy"), embedded=endpoint == "local",
        backend=backend, run_dir=run_dir_path(root, identity.sandbox_id), system_bundle=host.ca_bundle, rand=rand,
        passthrough=tuple(settings.get("env_passthrough", ())))
    if inspect_env:
        java = JAVA_ENV
        if java in inspect_env and base.get(java, "").strip():
            inspect_env = {**inspect_env, java: f"{base[java].strip()} {inspect_env[java]}"}  # the user's options kept
        base = frozen_map({**base, **inspect_env})
    settings["mounts"] = (*settings.get("mounts", ()), *inspect_mounts)
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
        allow_tcp=allow_tcp,
        policy_path=settings.get("policy"),
        seccomp_policy=settings.get("seccomp_policy"),
        mounts=tuple(settings.get("mounts", ())),
        mask_home_paths=tuple(settings.get("mask_home_paths", ())),
        mask_paths=mask_paths,
        writable_home_paths=tuple(settings.get("writable_home_paths", ())),
        sidecar=SidecarChoice(
            endpoint=validate_endpoint(endpoint),
            autostart=not args.no_autostart,
            startup_timeout_secs=float(timeout),
            tls=settings.get("sidecar_tls") if endpoint.startswith("tcp://") else None,
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
        config_path=cfg.paths[-1] if cfg.paths else None,
        config_paths=cfg.paths,
        config_sources=cfg.sources,
        keep_proofs=cfg.keep_proofs,
        audit_bounds=MappingProxyType(cfg.audit_bounds),
        quiet=args.quiet,
        limits=limit_request,
        workspace_read_only=args.read_only,
        caches=cache_names,
        terminal=args.terminal and host.setsid_path is not None,
        publish=published,
        timeout_secs=runopts.parse_duration(args.timeout) if args.timeout is not None else None,
        summary_json=posixpath.normpath(posixpath.join(cwd, args.summary_json)) if args.summary_json else None,
        protected_paths=tuple(settings.get("protected_paths", ())),
        weakenings=weakenings(profile, settings, sources, monitor=args.monitor, endpoint=endpoint,
                              allow_non_structural_env=is_truthy(env.get(env_names.RUN_ALLOW_NON_STRUCTURAL)))
        + tuple(Weakening("allow_hosts", w, sources.get("allow_hosts", "command line")) for w in checked_allow.warnings)
        + tuple(Weakening("allow_tcp", f"opaque TCP to {t}: any protocol, not inspected", sources.get("allow_tcp", "command line"))
                for t in allow_tcp)
        + tuple(Weakening("caches", f"cache {n} is shared between the runs in this workspace (one run's agent can "
                          "change what a later run's agent reads)", "command line" if n in args.cache else sources.get("caches", "config"))
                for n in cache_names)
        + tuple(Weakening("publish", f"the agent's port {p.port} is reachable at {p.bind}:{p.host_port}"
                          + ("" if p.loopback else " (not loopback: other machines can connect)"), "command line")
                for p in published)
        + tuple(Weakening("limits", detail, "command line" if args.limits_mode else sources.get("limits", "config"))
                for mode, detail in ((limits.BEST_EFFORT, "--limits best-effort: a limit this host cannot enforce is reported, not refused"),
                                     (limits.OFF, "--limits off: no memory, process, CPU or file limit; the agent can exhaust the host"))
                if limit_request.mode == mode),
        allow_notes=checked_allow.notes,
        on_workspace_findings=settings.get("on_workspace_findings", "fail"),
        inspection=inspection,
    )


# Variables that change what every program in the sandbox loads or runs.
_LOADER_VARS = re.compile(r"^(LD_|DYLD_)|^(PYTHONPATH|PYTHONSTARTUP|NODE_OPTIONS|PERL5OPT|RUBYOPT|BASH_ENV|ENV)$")


def weakenings(
    profile: profiles.Profile, settings: Mapping[str, Any], sources: Mapping[str, str], *, monitor: bool,
    endpoint: str, allow_non_structural_env: bool,
) -> tuple[Weakening, ...]:
    """Every setting that loosens a default, each with the layer it came from. Pure."""
    out: list[Weakening] = []

    def add(key: str, detail: str, source: str | None = None) -> None:
        out.append(Weakening(key, detail, source or sources.get(key, "default")))

    masked = set(settings.get("mask_home_paths", ()))
    for rel in profile.mask_home_paths:
        if rel not in masked:
            add("mask_home_paths", f"~/{rel} is not masked")
    for m in settings.get("mounts", ()):
        add("mounts", f"{m.source} -> {m.target} ({'read-only' if m.read_only else 'read-write'})")
    for rel in settings.get("writable_home_paths", ()):
        add("writable_home_paths", f"~/{rel} is writable (outside the workspace)")
    for name in settings.get("env_passthrough", ()):
        if _SECRETISH.search(name) or _LOADER_VARS.search(name):
            add("env_passthrough", f"{name} is passed to the agent")
    for name in settings.get("env_set", {}):
        if _SECRETISH.search(name) or _LOADER_VARS.search(name):
            add("env_set", f"{name} is set for the agent")
    if endpoint != "local":
        add("sidecar_endpoint", f"external sidecar {endpoint}: its decisions and audit are not firma's",
            sources.get("sidecar_endpoint", "command line or FIRMA_SIDECAR_ENDPOINT"))
    if monitor:
        add("monitor", "monitor mode: denials are logged, the traffic passes", "command line")
    if settings.get("allow_non_structural") or allow_non_structural_env:
        add("allow_non_structural", "a non-structural backend may run", sources.get("allow_non_structural", "environment"))
    return tuple(out)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if _SECRETISH.search(k) and v else v) for k, v in env.items()}


def plan_to_json(plan: RunPlan) -> dict[str, Any]:
    """The resolved plan for `--print-effective-config` (secret-looking values redacted)."""
    return {
        "config_path": plan.config_path,
        "config_sources": [s.as_json() for s in plan.config_sources],
        "weakenings": [{"setting": w.setting, "detail": w.detail, "source": w.source} for w in plan.weakenings],
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
        "allow_host_notes": list(plan.allow_notes),
        "allow_tcp": list(plan.allow_tcp),
        "inspection": plan.inspection.describe() if plan.inspection is not None else None,
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
        "mask_paths": list(plan.mask_paths),
        "protected_paths": list(plan.protected_paths),
        "writable_home_paths": list(plan.writable_home_paths),
        "on_workspace_findings": plan.on_workspace_findings,
        "workspace_read_only": plan.workspace_read_only,
        "timeout_secs": plan.timeout_secs,
        "caches": list(plan.caches),
        "terminal": plan.terminal,
        "publish": [{"bind": p.bind, "host_port": p.host_port, "port": p.port} for p in plan.publish],
        "limits": {
            "memory": plan.limits.memory, "pids": plan.limits.pids, "cpus": plan.limits.cpus,
            "nofile": plan.limits.nofile, "file_size": plan.limits.file_size, "mode": plan.limits.mode,
            "explicit": sorted(plan.limits.explicit),
        },
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

"""firma.toml: discovery, strict parsing and the layered merge (DESIGN §2).

Pure: discovery takes an `is_file` callable and parsing takes the file's text, so every rule is
testable without touching the disk. Layers, lowest first: built-in profile < `[run]` <
`[run.defaults]` < `[run.profiles.<name>]` < command line. Scalars: higher wins when present;
lists: present replaces (empty clears); maps: merge key by key."""

from __future__ import annotations

import posixpath
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ConfigError
from .model import Mount, SeccompPolicyRef, SidecarTls
from .profiles import ALIASES, BUILTIN, Profile
from .record import record, field
from .limits import check_table as check_limits_table
from .credentials import parse_credentials, refuse_shared_env
from .workspace_findings import parse_on_findings


_STR = "str"
_BOOL = "bool"
_LIST = "list[str]"
_MAP = "map[str,str]"
_PATH = "path"
_MOUNTS = "mounts"
_SECCOMP = "seccomp"
_RELPATHS = "workspace-relative paths"
_TLS = "tls"
_ON_FINDINGS = "fail|warn"
_LIMITS = "limits"

# key -> kind, for every layer below the command line.
SETTING_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "agent_id": _STR,
        "backend": _STR,
        "identity_mode": _STR,
        "allow_non_structural": _BOOL,
        "env_passthrough": _LIST,
        "env_set": _MAP,
        "mounts": _MOUNTS,
        "mask_home_paths": _LIST,
        "mask_paths": _LIST,
        "allow_hosts": _LIST,
        "allow_tcp": _LIST,
        "policy": _PATH,
        "seccomp_policy": _SECCOMP,
        "sidecar_endpoint": _STR,
        "sidecar_tls": _TLS,
        "protected_paths": _RELPATHS,
        "on_workspace_findings": _ON_FINDINGS,
        "limits": _LIMITS,
        "caches": _LIST,
        "inspect": _LIST,
        "no_inspect": _LIST,
    }
)
MAP_KEYS = frozenset(k for k, v in SETTING_KINDS.items() if v in (_MAP, _LIMITS))  # merged key by key

Layer = Mapping[str, Any]


@record
class ConfigFile:
    path: str | None = None
    profile: str | None = None  # [run].profile
    run: Layer = field(default_factory=dict)  # settings directly under [run]
    defaults: Layer = field(default_factory=dict)  # [run.defaults]
    profiles: Mapping[str, Layer] = field(default_factory=dict)  # [run.profiles.<name>]
    state: Layer = field(default_factory=dict)  # [state]: keep_proofs
    host: Mapping[str, str] = field(default_factory=dict)  # [host]: bwrap, python3 (absolute paths)
    audit: Mapping[str, int] = field(default_factory=dict)  # [audit]: the audit's bounds (AUDIT_KEYS)
    credentials: tuple[Any, ...] = ()  # [credentials.NAME]: core.credentials.CredentialSpec (trusted files only)


DEFAULT_KEEP_PROOFS = 1000  # proofs (and kept run logs) older than the newest N are pruned


HOST_BINARIES = ("bwrap", "python3")
# [audit] keys: each a positive integer, mapped onto core.auditcaps.AuditCaps
AUDIT_KEYS = ("events_per_second", "field_bytes", "min_free_mib", "rotate_mib", "keep_rotated")


def _audit_table(table: Any, path: str) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'audit' must be a table")
    for key, value in table.items():
        if key not in AUDIT_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}' in [audit]; known: {', '.join(AUDIT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: audit.{key} must be a positive integer")
    return dict(table)


def _host_table(table: Any, path: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'host' must be a table")
    for key, value in table.items():
        if key not in HOST_BINARIES:
            raise ConfigError(f"{path}: unknown key '{key}' in [host]; known: {', '.join(HOST_BINARIES)}")
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{path}: host.{key} must be an absolute path")
    return {k: posixpath.normpath(v) for k, v in table.items()}


def _state_table(table: Any, path: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'state' must be a table")
    for key, value in table.items():
        if key != "keep_proofs":
            raise ConfigError(f"{path}: unknown key '{key}' in [state]; known: keep_proofs")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: state.keep_proofs must be a positive integer")
    return dict(table)


EMPTY = ConfigFile()


def parse(text: str, path: str) -> ConfigFile:
    """Parse and validate one firma.toml; unknown keys name the key and the file."""
    import tomllib  # noqa: PLC0415 - only when a config file exists (launch latency)

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}; fix the file") from None
    base = posixpath.dirname(path)
    for key in doc:
        if key not in ("run", "state", "host", "audit", "credentials"):
            raise ConfigError(f"{path}: unknown key '{key}'; only [run], [state], [host], [audit] and [credentials.NAME] "
                              "are supported")
    state = _state_table(doc.get("state", {}), path)
    audit = _audit_table(doc.get("audit", {}), path)
    host = _host_table(doc.get("host", {}), path)
    credentials = parse_credentials(doc.get("credentials", {}), path)
    run = doc.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: 'run' must be a table")
    profile = run.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise ConfigError(f"{path}: run.profile must be a string")
    top = {k: v for k, v in run.items() if k not in ("profile", "defaults", "profiles")}
    defaults = run.get("defaults", {})
    profiles_raw = run.get("profiles", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: run.defaults must be a table")
    if not isinstance(profiles_raw, dict):
        raise ConfigError(f"{path}: run.profiles must be a table of profiles")
    profiles: dict[str, Layer] = {}
    for name, layer in profiles_raw.items():
        canon = name if name in BUILTIN else ALIASES.get(name)
        if canon is None:
            raise ConfigError(
                f"{path}: unknown profile '{name}' in run.profiles; supported profiles: "
                "generic, claude-code, codex"
            )
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: run.profiles.{name} must be a table")
        parsed = _layer(layer, f"run.profiles.{name}", path, base)
        # An alias table and the canonical table both apply; the canonical one wins.
        merged = merge([profiles.get(canon, {}), parsed] if name == canon else [parsed, profiles.get(canon, {})])
        profiles[canon] = merged
    return ConfigFile(
        path=path,
        profile=profile,
        state=state,
        host=host,
        audit=audit,
        credentials=credentials,
        run=_layer(top, "run", path, base),
        defaults=_layer(defaults, "run.defaults", path, base),
        profiles=profiles,
    )


def _layer(table: Mapping[str, Any], where: str, path: str, base: str) -> Layer:
    out: dict[str, Any] = {}
    for key, value in table.items():
        kind = SETTING_KINDS.get(key)
        if kind is None:
            raise ConfigError(f"{path}: unknown key '{key}' in [{where}]")
        out[key] = _value(kind, value, f"{where}.{key}", path, base)
    return out


def _value(kind: str, value: Any, name: str, path: str, base: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{path}: {name} must be {expected}")

    if kind == _STR:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == _LIST:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if kind == _RELPATHS:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise bad("a list of non-empty paths relative to the workspace")
        for v in value:
            if v.startswith("/") or ".." in v.split("/") or posixpath.normpath(v) == ".":
                raise ConfigError(
                    f"{path}: {name} entries must be relative to the workspace without '..': {v}"
                )
        return tuple(dict.fromkeys(posixpath.normpath(v) for v in value))
    if kind == _ON_FINDINGS:
        return parse_on_findings(value, f"{path}: {name}")
    if kind == _LIMITS:
        return check_limits_table(value, f"{path}: {name}")
    if kind == _MAP:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        return dict(value)
    if kind == _PATH:
        if not isinstance(value, str) or not value.strip():
            raise bad("a non-empty path")
        return _resolve(base, value)
    if kind == _SECCOMP:
        if not isinstance(value, dict) or set(value) != {"source_policy_path", "artifact_dir"}:
            raise bad("a table with exactly source_policy_path and artifact_dir")
        if not all(isinstance(v, str) and v.strip() for v in value.values()):
            raise bad("a table of non-empty paths")
        return SeccompPolicyRef(
            _resolve(base, value["source_policy_path"]), _resolve(base, value["artifact_dir"])
        )
    if kind == _TLS:
        if not isinstance(value, dict) or set(value) != {"cert", "key", "ca"}:
            raise bad("a table with exactly cert, key and ca")
        if not all(isinstance(v, str) and v.strip() for v in value.values()):
            raise bad("a table of non-empty paths")
        return SidecarTls(_resolve(base, value["cert"]), _resolve(base, value["key"]), _resolve(base, value["ca"]))
    if kind == _MOUNTS:
        if not isinstance(value, list):
            raise bad("a list of {source, target, read_only} tables")
        mounts = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not {"source", "target"} <= set(m) or not set(m) <= {
                "source",
                "target",
                "read_only",
            }:
                raise bad(f"a list of {{source, target, read_only}} tables (entry {i})")
            src, tgt, ro = m["source"], m["target"], m.get("read_only", False)
            if not isinstance(src, str) or not isinstance(tgt, str) or not isinstance(ro, bool):
                raise bad(f"a list of {{source, target, read_only}} tables (entry {i})")
            if not tgt.startswith("/"):
                raise ConfigError(f"{path}: {name}[{i}].target must be absolute: {tgt}")
            mounts.append(Mount(_resolve(base, src), posixpath.normpath(tgt), ro))
        return tuple(mounts)
    raise AssertionError(kind)


def _resolve(base: str, p: str) -> str:
    return posixpath.normpath(posixpath.join(base, p))


def profile_layer(profile: Profile) -> Layer:
    return {
        "env_passthrough": profile.env_passthrough,
        "env_set": dict(profile.env_set),
        "allow_hosts": profile.allow_hosts,
        "mask_home_paths": profile.mask_home_paths,
        "writable_home_paths": profile.writable_home_paths,
    }


def merge(layers: list[Layer]) -> dict[str, Any]:
    """Lowest first. Maps merge key by key; everything else (scalars, lists) is replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key in MAP_KEYS and key in out:
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


@record
class ConfigSet:
    """The config files of one run, lowest precedence first, each with whether it is trusted (an
    untrusted one is already reduced to its narrowing keys: see core.configtrust)."""

    files: tuple[tuple[ConfigFile, bool], ...] = ()
    sources: tuple[Any, ...] = ()  # configtrust.ConfigSource, for the notice and the proof

    @staticmethod
    def single(cfg: ConfigFile) -> "ConfigSet":
        return ConfigSet(((cfg, True),) if cfg.path is not None else ())

    @property
    def profile(self) -> str | None:
        """`[run].profile` of the highest trusted file that sets it."""
        for cfg, trusted in reversed(self.files):
            if trusted and cfg.profile is not None:
                return cfg.profile
        return None

    @property
    def host_binaries(self) -> dict[str, str]:
        """`[host]` paths, from trusted files only (a higher file wins per key)."""
        out: dict[str, str] = {}
        for cfg, trusted in self.files:
            if trusted:
                out.update(cfg.host)
        return out

    @property
    def audit_bounds(self) -> dict[str, int]:
        """`[audit]` from trusted files only (a higher file wins per key)."""
        out: dict[str, int] = {}
        for cfg, trusted in self.files:
            if trusted:
                out.update(cfg.audit)
        return out

    @property
    def credentials(self) -> tuple[Any, ...]:
        """`[credentials.NAME]` from trusted files only (a higher file wins per name)."""
        out: dict[str, Any] = {}
        for cfg, trusted in self.files:
            if trusted:
                out.update({c.name: c for c in cfg.credentials})
        refuse_shared_env(out.values(), "trusted configuration")
        return tuple(out.values())

    @property
    def keep_proofs(self) -> int:
        """`[state].keep_proofs` of the highest trusted file that sets it."""
        for cfg, trusted in reversed(self.files):
            if trusted and "keep_proofs" in cfg.state:
                return int(cfg.state["keep_proofs"])
        return DEFAULT_KEEP_PROOFS

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(cfg.path for cfg, _ in self.files if cfg.path is not None)


def effective(profile: Profile, cfgs: ConfigSet | ConfigFile, cli: Layer) -> dict[str, Any]:
    """The merged settings for one run: the profile, then each file (its [run], [run.defaults],
    [run.profiles.<name>]), then the command line. An untrusted file's lists only add."""
    return effective_with_sources(profile, cfgs, cli)[0]


def effective_with_sources(
    profile: Profile, cfgs: ConfigSet | ConfigFile, cli: Layer
) -> tuple[dict[str, Any], dict[str, str]]:
    """`effective`, and for each setting the layer that last set it ("profile claude-code",
    "/path/firma.toml [run.defaults]", "command line"): the proof names where a weakening came from."""
    from .configtrust import union_lists  # noqa: PLC0415 - configtrust imports this module

    if isinstance(cfgs, ConfigFile):
        cfgs = ConfigSet.single(cfgs)
    base = profile_layer(profile)
    out = merge([base])
    sources = {k: f"profile {profile.name}" for k, v in base.items() if v is not None}
    for cfg, trusted in cfgs.files:
        named = (("run", cfg.run), ("run.defaults", cfg.defaults),
                 (f"run.profiles.{profile.name}", cfg.profiles.get(profile.name, {})))
        for where, layer in named:
            out = merge([out, layer]) if trusted else union_lists(out, layer)
            sources.update({k: f"{cfg.path} [{where}]" for k in layer})
    out = merge([out, cli])
    sources.update({k: "command line" for k, v in cli.items() if v is not None})
    return out, sources

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
from .model import Mount, SeccompPolicyRef
from .profiles import ALIASES, BUILTIN, Profile
from .record import record, field
from .workspace_findings import parse_on_findings


_STR = "str"
_BOOL = "bool"
_LIST = "list[str]"
_MAP = "map[str,str]"
_PATH = "path"
_MOUNTS = "mounts"
_SECCOMP = "seccomp"
_RELPATHS = "workspace-relative paths"
_ON_FINDINGS = "fail|warn"

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
        "allow_hosts": _LIST,
        "policy": _PATH,
        "seccomp_policy": _SECCOMP,
        "sidecar_endpoint": _STR,
        "protected_paths": _RELPATHS,
        "on_workspace_findings": _ON_FINDINGS,
    }
)
MAP_KEYS = frozenset(k for k, v in SETTING_KINDS.items() if v == _MAP)

Layer = Mapping[str, Any]


@record
class ConfigFile:
    path: str | None = None
    profile: str | None = None  # [run].profile
    run: Layer = field(default_factory=dict)  # settings directly under [run]
    defaults: Layer = field(default_factory=dict)  # [run.defaults]
    profiles: Mapping[str, Layer] = field(default_factory=dict)  # [run.profiles.<name>]


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
        if key != "run":
            raise ConfigError(f"{path}: unknown key '{key}'; only [run] is supported")
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


def effective(profile: Profile, cfg: ConfigFile, cli: Layer) -> dict[str, Any]:
    """The merged settings for one run."""
    return merge(
        [profile_layer(profile), cfg.run, cfg.defaults, cfg.profiles.get(profile.name, {}), cli]
    )

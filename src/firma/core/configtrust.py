"""Configuration trust classes (DESIGN §15). Pure: parsed config files and trust records in,
filtered layers and verdicts out.

Widening settings come only from places the user controls: the command line, `--config` /
`FIRMA_CONFIG`, the user config outside any workspace, and a project config the user has trusted
with `firma trust` (the record pins the sha256 of the config and of every file it references).
From an untrusted project config only narrowing keys are honoured, and its lists only add."""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

from ..errors import ConfigError
from .config import ConfigFile, Layer
from .limits import CEILING
from .record import field, record

# Where a config file came from (most trusted first, after the command line).
EXPLICIT = "--config"
ENVIRONMENT = "FIRMA_CONFIG"
USER = "user config"
PROJECT = "project config"

# Narrowing keys an untrusted project config may set. Lists add to what the trusted layers say
# (union); a scalar is honoured only with its narrowing value.
ADD_ONLY = frozenset({"mask_paths", "protected_paths", "no_inspect"})
NARROWING_VALUES: Mapping[str, Any] = {"on_workspace_findings": "fail"}
NARROWING = ADD_ONLY | frozenset(NARROWING_VALUES) | {"limits"}

TRUST_FORMAT = 1


@record
class ConfigSource:
    """One config file considered for a run, for the launch notice and the proof."""

    path: str
    origin: str  # EXPLICIT | ENVIRONMENT | USER | PROJECT
    trusted: bool
    state: str  # "trusted (…)", "untrusted", "not read: <why>"
    sha256: str | None = None
    ignored: tuple[str, ...] = ()  # widening keys not honoured (untrusted)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "origin": self.origin, "trusted": self.trusted, "state": self.state,
            "sha256": self.sha256, "ignored_keys": list(self.ignored),
        }


@record
class TrustEntry:
    """`firma trust` of one project config: its sha256 and that of every file it references."""

    config: str
    sha256: str
    files: Mapping[str, str] = field(default_factory=dict)  # referenced path -> sha256 ("" = absent)
    trusted_at: str = ""


def referenced_files(cfg: ConfigFile) -> tuple[str, ...]:
    """Files a config makes firma read as policy: the Cedar files and seccomp policy sources of
    every layer. Trust pins them too: a trusted config naming a file the agent can rewrite would
    otherwise hand the agent the policy."""
    out: list[str] = []
    for layer in (cfg.run, cfg.defaults, *cfg.profiles.values()):
        if (p := layer.get("policy")) is not None:
            out.append(p)
        if (s := layer.get("seccomp_policy")) is not None:
            out.append(s.source_policy_path)
    return tuple(dict.fromkeys(out))


def _narrow_layer(layer: Layer) -> tuple[dict[str, Any], list[str]]:
    kept: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in layer.items():
        if key == "limits":
            # lower limits only (applied as a ceiling, core.limits.request); a looser mode widens
            kept[key] = {k: v for k, v in value.items() if k != "mode" or v == "strict"}
            if value.get("mode", "strict") != "strict":
                ignored.append("limits.mode")
        elif key in ADD_ONLY or (key in NARROWING_VALUES and value == NARROWING_VALUES[key]):
            kept[key] = value
        else:
            ignored.append(key)
    return kept, ignored


def narrow(cfg: ConfigFile) -> tuple[ConfigFile, tuple[str, ...]]:
    """An untrusted config reduced to its narrowing keys, and the keys it was refused (sorted)."""
    ignored: list[str] = []
    if cfg.profile is not None:
        ignored.append("profile")
    run, i1 = _narrow_layer(cfg.run)
    defaults, i2 = _narrow_layer(cfg.defaults)
    profiles: dict[str, Layer] = {}
    ignored += i1 + i2
    for name, layer in cfg.profiles.items():
        profiles[name], i3 = _narrow_layer(layer)
        ignored += i3
    ignored += [f"state.{k}" for k in cfg.state] + [f"host.{k}" for k in cfg.host] + [f"audit.{k}" for k in cfg.audit]
    ignored += [f"credentials.{c.name}" for c in cfg.credentials]
    narrowed = ConfigFile(path=cfg.path, profile=None, run=run, defaults=defaults, profiles=profiles)
    return narrowed, tuple(sorted(set(ignored)))


def union_lists(base: Mapping[str, Any], untrusted: Mapping[str, Any]) -> dict[str, Any]:
    """Settings after an untrusted layer: its add-only lists are appended, never replace; its
    narrowing scalars (already filtered by `narrow`) apply."""
    out = dict(base)
    for key, value in untrusted.items():
        if key == "limits":
            out[CEILING] = {**out.get(CEILING, {}), **value}
        elif key in ADD_ONLY:
            out[key] = tuple(dict.fromkeys((*out.get(key, ()), *value)))
        else:
            out[key] = value
    return out


def verdict(entry: TrustEntry | None, sha256: str, files: Mapping[str, str]) -> tuple[bool, str]:
    """Is a project config with this sha256 (and these referenced files' sha256) trusted?"""
    if entry is None:
        return False, "untrusted"
    if entry.sha256 != sha256:
        return False, "untrusted: changed since `firma trust`"
    for path, digest in files.items():
        if entry.files.get(path) != digest:
            return False, f"untrusted: {path} changed since `firma trust`"
    return True, f"trusted by `firma trust` {entry.trusted_at}".rstrip()


def parse_trust(text: str, where: str) -> dict[str, TrustEntry]:
    """trust.toml: `format = 1` and `[[trusted]]` tables {config, sha256, files, trusted_at}."""
    import tomllib  # noqa: PLC0415 - only when a trust file exists (launch latency)

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}; fix or remove it (firma trust rewrites it)") from None
    if doc.get("format") != TRUST_FORMAT:
        raise ConfigError(f"{where}: unknown format {doc.get('format')!r}; remove it and trust again")
    out: dict[str, TrustEntry] = {}
    for i, t in enumerate(doc.get("trusted", [])):
        ok = (
            isinstance(t, dict) and isinstance(t.get("config"), str) and isinstance(t.get("sha256"), str)
            and isinstance(t.get("files", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in t.get("files", {}).items())
        )
        if not ok:
            raise ConfigError(f"{where}: trusted[{i}] is malformed; remove it and trust again")
        out[t["config"]] = TrustEntry(t["config"], t["sha256"], dict(t.get("files", {})), str(t.get("trusted_at", "")))
    return out


def render_trust(entries: Mapping[str, TrustEntry]) -> str:
    """trust.toml text (TOML basic strings: JSON string escapes are valid in them)."""
    q = json.dumps
    lines = ["# Written by `firma trust`: project configs whose widening keys firma honours.",
             f"format = {TRUST_FORMAT}", ""]
    for path in sorted(entries):
        e = entries[path]
        files = ", ".join(f"{q(k)} = {q(v)}" for k, v in sorted(e.files.items()))
        lines += ["[[trusted]]", f"config = {q(e.config)}", f"sha256 = {q(e.sha256)}",
                  f"trusted_at = {q(e.trusted_at)}", f"files = {{ {files} }}" if files else "files = {}", ""]
    return "\n".join(lines)


def inside(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def notice(sources: tuple[ConfigSource, ...]) -> str | None:
    """One line naming what was not honoured, or None."""
    parts = []
    for s in sources:
        if s.ignored:
            parts.append(
                f"{s.origin} {s.path} is {s.state}: ignored {', '.join(s.ignored)}; review it, then "
                f"`firma trust {s.path}` to honour them"
            )
        elif s.state.startswith("not read"):
            parts.append(f"{s.origin} {s.path} {s.state}")
    return "; ".join(parts) if parts else None

"""Tool caches that survive runs (DESIGN §5.6). Pure: names, paths and variables.

A cache lives under a root of firma's own (`$XDG_CACHE_HOME/firma`, else `~/.cache/firma`; never
the state root, which is never visible inside, and never your own tools' cache directories), one
directory per workspace and tool, mounted read-write inside under /tmp/.firma-cache/ and named by
the variable the tool reads. A cache is shared between the runs in one workspace: one run's agent
can put there what a later run's agent reads. That is why caches are opt-in (`[run].caches` in
trusted configuration, `--cache NAME`) and listed as a weakening."""

from __future__ import annotations

import hashlib
import posixpath
from typing import Mapping

from ..errors import ConfigError
from .model import Mount

TARGET_ROOT = "/tmp/.firma-cache"  # inside: /tmp is the sandbox's own tmpfs, so bwrap can make the mount points

# name -> (variable, value) pairs; {dir} is the cache's path inside
KNOWN: Mapping[str, tuple[tuple[str, str], ...]] = {
    "pip": (("PIP_CACHE_DIR", "{dir}"),),
    "uv": (("UV_CACHE_DIR", "{dir}"),),
    "npm": (("npm_config_cache", "{dir}"),),
    "cargo": (("CARGO_HOME", "{dir}"),),  # registry, git checkouts; also where `cargo install` puts binaries
    "go": (("GOMODCACHE", "{dir}/mod"), ("GOCACHE", "{dir}/build")),
    "maven": (("MAVEN_OPTS", "-Dmaven.repo.local={dir}"),),
    "gradle": (("GRADLE_USER_HOME", "{dir}"),),
}


def cache_root(environ: Mapping[str, str]) -> str | None:
    xdg = environ.get("XDG_CACHE_HOME", "").strip()
    if xdg.startswith("/"):
        return posixpath.join(posixpath.normpath(xdg), "firma")
    home = environ.get("HOME", "").strip()
    return posixpath.join(posixpath.normpath(home), ".cache", "firma") if home.startswith("/") else None


def workspace_key(cwd: str) -> str:
    """The workspace's directory under the cache root: its name and a hash of its path."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in (posixpath.basename(cwd) or "root"))[:40]
    return f"{base}-{hashlib.sha256(cwd.encode()).hexdigest()[:12]}"


def check_names(names: tuple[str, ...], what: str) -> tuple[str, ...]:
    for n in names:
        if n not in KNOWN:
            raise ConfigError(f"{what}: unknown cache '{n}'; known: {', '.join(KNOWN)}")
    return tuple(dict.fromkeys(names))


def plan_caches(names: tuple[str, ...], *, cwd: str, environ: Mapping[str, str], state_root: str
                ) -> tuple[tuple[Mount, ...], dict[str, str]]:
    """The mounts (host directory -> /tmp/.firma-cache/NAME, read-write) and variables of the
    caches `names` for the workspace `cwd`."""
    if not names:
        return (), {}
    root = cache_root(environ)
    if root is None:
        raise ConfigError("caches need a cache root: set HOME or XDG_CACHE_HOME")
    for inner, outer, why in ((root, cwd, "inside the workspace"), (root, state_root, "inside the state root"),
                              (state_root, root, "around the state root"), (cwd, root, "around the workspace")):
        if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
            raise ConfigError(f"the cache root {root} is {why}; set XDG_CACHE_HOME elsewhere or drop the caches")
    base = posixpath.join(root, workspace_key(cwd))
    mounts: list[Mount] = []
    env: dict[str, str] = {}
    for name in names:
        inside = posixpath.join(TARGET_ROOT, name)
        mounts.append(Mount(posixpath.join(base, name), inside, False))
        for var, template in KNOWN[name]:
            env[var] = template.format(dir=inside)
    return tuple(mounts), env

"""Reading the config files of a run and deciding how far each is trusted (DESIGN §15).

Order, lowest precedence first: the user config (`$XDG_CONFIG_HOME/firma/config.toml`), then
`--config` / `FIRMA_CONFIG` when given, else the project config found from the working directory
up. Every file is read by the private-path rule (`privfs.read_private`: never through a final
symlink, owned by the caller or root, nobody else can write it or a directory above it); a
project config failing it is not read at all, and one not trusted with `firma trust` is reduced
to its narrowing keys. A user config inside the workspace counts as a project config: the agent
could have written it."""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Mapping

from . import privfs
from .core import config as cfgmod
from .core import configtrust as trust
from .core import settings
from .errors import ConfigError
from .privfs import PrivatePathError

MAX_CONFIG_BYTES = 1 << 20


def _read(path: str, what: str) -> bytes:
    data, mode = privfs.read_private(path, MAX_CONFIG_BYTES, what=what)
    if not data and not (mode & 0o170000 == 0o100000):
        raise PrivatePathError(f"{what} {path} is not a regular file")
    return data


def _parse(data: bytes, path: str) -> cfgmod.ConfigFile:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8; fix the file") from None
    return cfgmod.parse(text, path)


def file_sha256(path: str) -> str:
    """sha256 of a referenced file ("" when it cannot be read: trusting pins that too)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def trust_path(environ) -> str | None:
    d = settings.user_config_dir(environ)
    return posixpath.join(d, settings.TRUST_NAME) if d else None


def read_trust(environ) -> dict[str, trust.TrustEntry]:
    path = trust_path(environ)
    if path is None:
        return {}
    try:
        data = _read(path, "trust file")
    except FileNotFoundError:
        return {}
    except PrivatePathError as exc:
        raise ConfigError(f"{exc}; firma reads trust records only from a private file") from None
    return trust.parse_trust(data.decode("utf-8", "replace"), path)


def _project(path: str, origin: str, entries: dict[str, trust.TrustEntry]) -> tuple[cfgmod.ConfigFile | None, trust.ConfigSource]:
    """A project config: not read when it fails the private-path rule; narrowed unless trusted."""
    try:
        data = _read(path, "project config")
    except (PrivatePathError, FileNotFoundError) as exc:
        return None, trust.ConfigSource(path, origin, False, f"not read: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    cfg = _parse(data, path)
    files = {p: file_sha256(p) for p in trust.referenced_files(cfg)}
    ok, state = trust.verdict(entries.get(path), sha, files)
    if ok:
        return cfg, trust.ConfigSource(path, origin, True, state, sha)
    narrowed, ignored = trust.narrow(cfg)
    return narrowed, trust.ConfigSource(path, origin, False, state, sha, ignored)


def _trusted(path: str, origin: str) -> tuple[cfgmod.ConfigFile, trust.ConfigSource]:
    """A file the user named (or their own config): read by the private-path rule or refused."""
    try:
        data = _read(path, f"config file ({origin})")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from {origin}) does not exist; fix the path") from None
    except PrivatePathError as exc:
        raise ConfigError(f"{exc}; firma reads configuration only from files you control") from None
    sha = hashlib.sha256(data).hexdigest()
    return _parse(data, path), trust.ConfigSource(path, origin, True, "trusted (named by you)" if origin != trust.USER else "trusted (your user config)", sha)


def load(explicit: str | None, environ: Mapping[str, str], cwd: str) -> cfgmod.ConfigSet:
    """Read before the host is detected: `[host]` in trusted files names the binaries to use."""
    env = environ
    files: list[tuple[cfgmod.ConfigFile, bool]] = []
    sources: list[trust.ConfigSource] = []
    entries: dict[str, trust.TrustEntry] | None = None

    def trust_entries() -> dict[str, trust.TrustEntry]:
        nonlocal entries
        if entries is None:
            entries = read_trust(env)
        return entries

    user_dir = settings.user_config_dir(env)
    if user_dir is not None:
        user = posixpath.join(user_dir, settings.USER_CONFIG_NAME)
        if os.path.lexists(user):
            if trust.inside(user, cwd):
                cfg, src = _project(user, trust.USER, trust_entries())
            else:
                cfg, src = _trusted(user, trust.USER)
            sources.append(src)
            if cfg is not None:
                files.append((cfg, src.trusted))
    named = settings.explicit_config(explicit, env, cwd)
    if named is not None:
        cfg, src = _trusted(*named)
        files.append((cfg, True))
        sources.append(src)
    else:
        project = settings.project_config(env, cwd, os.path.isfile)
        if project is not None:
            cfg_or_none, src = _project(project, trust.PROJECT, trust_entries())
            sources.append(src)
            if cfg_or_none is not None:
                files.append((cfg_or_none, src.trusted))
    return cfgmod.ConfigSet(tuple(files), tuple(sources))

"""firma's settings from the environment, in one place: every `FIRMA_*` variable firma reads or
sets, config discovery, the state root and the one truthiness rule. Pure: the environment arrives
as a mapping (from the Host value) and file checks as callables."""

from __future__ import annotations

import posixpath
from typing import Callable, Mapping

from ..errors import ConfigError

TRUTHY = frozenset({"1", "true", "yes", "on"})

# Read from the user's environment.
CONFIG = "FIRMA_CONFIG"  # a config file, after --config
STATE_DIR = "FIRMA_STATE_DIR"  # the state root
SIDECAR_ENDPOINT = "FIRMA_SIDECAR_ENDPOINT"  # an external sidecar, after --sidecar
RUN_ALLOW_NON_STRUCTURAL = "FIRMA_RUN_ALLOW_NON_STRUCTURAL"
RUN_KEEP_MARKERS = "FIRMA_RUN_KEEP_MARKERS"  # any non-blank value keeps the run dir (debugging)
RUN_RUNNER = "FIRMA_RUN_RUNNER"  # the runner backend's runner executable
VZ_GUEST = "FIRMA_RUN_VZ_GUEST"
VZ_STRUCTURAL_NETWORK = "FIRMA_RUN_VZ_STRUCTURAL_NETWORK"
VZ_GUEST_RUNNER = "FIRMA_RUN_VZ_GUEST_RUNNER"
VZ_GUEST_KERNEL = "FIRMA_RUN_VZ_GUEST_KERNEL"
VZ_GUEST_INITRD = "FIRMA_RUN_VZ_GUEST_INITRD"
VZ_GUEST_ROOTFS = "FIRMA_RUN_VZ_GUEST_ROOTFS"

# Set in the agent's environment (and, for the session id, taken from the caller's when given).
RUN_SANDBOX_ID = "FIRMA_RUN_SANDBOX_ID"
RUN_SESSION_ID = "FIRMA_RUN_SESSION_ID"
RUN_PROFILE = "FIRMA_RUN_PROFILE"
AGENT_ID = "FIRMA_AGENT_ID"
DNS_STUB_ADDR = "FIRMA_DNS_STUB_ADDR"  # vz structural modes: the host DNS stub

# Never passed to an agent.
CAPABILITY_TOKEN = "FIRMA_CAPABILITY_TOKEN"

CONFIG_DIR = ".firma"
CONFIG_NAME = "firma.toml"
USER_CONFIG_NAME = "config.toml"  # $XDG_CONFIG_HOME/firma/config.toml
TRUST_NAME = "trust.toml"  # $XDG_CONFIG_HOME/firma/trust.toml (never in the state root)


def user_config_dir(environ: Mapping[str, str]) -> str | None:
    """`$XDG_CONFIG_HOME/firma`, else `$HOME/.config/firma` (None without either)."""
    xdg = environ.get("XDG_CONFIG_HOME", "").strip()
    if xdg.startswith("/"):
        return posixpath.join(posixpath.normpath(xdg), "firma")
    home = environ.get("HOME", "").strip()
    if home.startswith("/"):
        return posixpath.join(posixpath.normpath(home), ".config", "firma")
    return None


def explicit_config(explicit: str | None, environ: Mapping[str, str], cwd: str) -> tuple[str, str] | None:
    """(path, origin) of `--config`, else `FIRMA_CONFIG`, else None."""
    for origin, value in (("--config", explicit), (CONFIG, environ.get(CONFIG))):
        if value is not None and value.strip():
            return posixpath.normpath(posixpath.join(cwd, value.strip())), origin
    return None


def project_config(environ: Mapping[str, str], cwd: str, is_file: Callable[[str], bool]) -> str | None:
    """The nearest `.firma/firma.toml` from cwd upwards, stopping at `$HOME` or `/`."""
    d = posixpath.normpath(cwd)
    home = environ.get("HOME")
    stop = posixpath.normpath(home) if home else None
    while True:
        candidate = posixpath.join(d, CONFIG_DIR, CONFIG_NAME)
        if is_file(candidate):
            return candidate
        if d == "/" or d == stop:
            return None
        d = posixpath.dirname(d)


def is_truthy(value: str | None) -> bool:
    """`1|true|yes|on`, trimmed, any case (ref)."""
    return value is not None and value.strip().lower() in TRUTHY


def state_root(environ: Mapping[str, str], uid: int) -> str:
    """`$FIRMA_STATE_DIR` → `$XDG_RUNTIME_DIR/firma` → `/tmp/firma-$UID`."""
    explicit = environ.get(STATE_DIR, "").strip()
    if explicit:
        if not explicit.startswith("/"):
            raise ConfigError(f"{STATE_DIR} must be an absolute path: {explicit}")
        return posixpath.normpath(explicit)
    xdg = environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg.startswith("/"):
        return posixpath.join(posixpath.normpath(xdg), "firma")
    return f"/tmp/firma-{uid}"


def discover_config(
    explicit: str | None,
    environ: Mapping[str, str],
    cwd: str,
    is_file: Callable[[str], bool],
) -> str | None:
    """`--config`, then `FIRMA_CONFIG`, then the nearest `.firma/firma.toml` from cwd upwards,
    stopping at `$HOME` or `/`. An explicitly named file that does not exist is an error."""
    named = explicit_config(explicit, environ, cwd)
    if named is not None:
        path, origin = named
        if not is_file(path):
            raise ConfigError(f"config file {path} (from {origin}) does not exist; fix the path")
        return path
    return project_config(environ, cwd, is_file)

"""The everyday `firma run` options (DESIGN §1, §16), parsed. Pure.

`--env NAME[=VALUE]`, `--mount SRC[:DST][:ro|rw]`, `--allow-write PATH`, `--timeout DURATION`.
They are the user's own words (the command line), so they count as trusted, but a mount still
never opens firma's state root, the user config directory or the trust store
(core.mountcheck): the agent could otherwise write the next run's trusted policy."""

from __future__ import annotations

import posixpath
import re

from ..errors import ConfigError
from .model import Mount, Publish

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?\Z")
_UNIT_SECS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
TIMEOUT_GRACE_SECS = 10.0  # between --timeout's SIGTERM and the SIGKILL of everything left
TIMEOUT_STATUS = 124  # as timeout(1)


def parse_env(specs: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """(names passed through from your environment, names set to a value)."""
    passthrough: list[str] = []
    values: dict[str, str] = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--env {spec}: give NAME or NAME=VALUE (a name of letters, digits and _)")
        if eq:
            values[name] = value
        elif name not in passthrough:
            passthrough.append(name)
    return tuple(passthrough), values


def parse_mount(spec: str, cwd: str) -> Mount:
    """`SRC[:DST][:ro|rw]`: SRC relative to the working directory, DST default SRC, rw default
    (as `docker run -v`)."""
    parts = spec.split(":")
    mode = "rw"
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        mode = parts.pop()
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise ConfigError(f"--mount {spec}: give SRC[:DST][:ro|rw] (paths without ':')")
    src = posixpath.normpath(posixpath.join(cwd, parts[0]))
    dst = posixpath.normpath(parts[1]) if len(parts) == 2 and parts[1] else src
    if not dst.startswith("/"):
        raise ConfigError(f"--mount {spec}: the target must be absolute")
    return Mount(src, dst, mode == "ro")


def parse_publish(spec: str) -> Publish:
    """`[[BIND:]HOST_PORT:]PORT`: the agent's PORT inside at BIND:HOST_PORT on the host (BIND
    127.0.0.1 and HOST_PORT = PORT by default; an IPv6 BIND in brackets)."""
    bind = "127.0.0.1"
    rest = spec.strip()
    if rest.startswith("["):
        end = rest.find("]:")
        if end < 0:
            raise ConfigError(f"--publish {spec}: give [[BIND:]HOST_PORT:]PORT")
        bind, rest = rest[1:end], rest[end + 2:]
    parts = rest.split(":")
    if len(parts) == 3 and bind == "127.0.0.1":
        bind = parts.pop(0)
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and 1 <= int(p) <= 65535 for p in parts):
        raise ConfigError(f"--publish {spec}: give [[BIND:]HOST_PORT:]PORT with ports 1-65535")
    port = int(parts[-1])
    return Publish(bind=bind, host_port=int(parts[0]) if len(parts) == 2 else port, port=port)


def parse_duration(text: str, what: str = "--timeout") -> float:
    """`90`, `30s`, `10m`, `2h`, `1d`, `500ms` → seconds (> 0)."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ConfigError(f"{what} {text}: give a duration such as 90, 30s, 10m or 2h")
    secs = float(m.group(1)) * _UNIT_SECS[m.group(2)]
    if not secs > 0:
        raise ConfigError(f"{what} {text}: the duration must be positive")
    return secs


def timeout_note(secs: float | None) -> str:
    """The run summary's line for a run --timeout ended."""
    return (f"--timeout {secs:g}s reached: the agent got SIGTERM (SIGKILL after {TIMEOUT_GRACE_SECS:g}s); "
            f"exit status {TIMEOUT_STATUS}")

"""Sidecar endpoints as text, one grammar (pure): `local`, `tcp://HOST:PORT` and `unix:///PATH`.

HOST is a name or IPv4 literal of letters, digits, dots and dashes, or a bracketed IPv6 literal;
PORT is 1-65535 (0 only for a listen address, where the kernel picks one)."""

from __future__ import annotations

import re

from ..errors import ConfigError, SidecarError

HEALTH_PATH = "/__firma/health"  # a sidecar answers GET here with 200 once it serves
LOCAL = "local"  # the embedded sidecar

_TCP = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})/?$")
_FORMS = "expected tcp://HOST:PORT or unix:///PATH"


def parse_endpoint(endpoint: str, *, listen: bool = False) -> tuple[str, str | tuple[str, int]]:
    """`tcp://H:P` → ("tcp", (H, P)) with IPv6 brackets removed; `unix:///P` → ("unix", P).
    Raises SidecarError naming the forms."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/") or path == "/":
            raise SidecarError(f"invalid endpoint {endpoint!r}: unix:// needs an absolute path (unix:///run/x.sock)")
        return "unix", path
    m = _TCP.match(endpoint)
    if m is None:
        raise SidecarError(f"invalid endpoint {endpoint!r}: {_FORMS}")
    port = int(m.group(2))
    if not (0 if listen else 1) <= port <= 65535:
        raise SidecarError(f"invalid endpoint {endpoint!r}: port must be 1-65535")
    return "tcp", (m.group(1).strip("[]"), port)


def validate_endpoint(endpoint: str) -> str:
    """A `--sidecar` / config endpoint: `local` or a connectable endpoint, trimmed. ConfigError."""
    e = endpoint.strip()
    if e == LOCAL:
        return e
    try:
        parse_endpoint(e)
    except SidecarError:
        raise ConfigError(f"invalid sidecar endpoint '{endpoint}'; expected local, tcp://HOST:PORT or unix:///PATH") from None
    return e


def listen_is_local(endpoint: str) -> bool:
    """True for a unix socket or a loopback TCP address (`127.0.0.0/8`, `::1`, `localhost`): the
    only places a sidecar without client authentication may listen."""
    kind, where = parse_endpoint(endpoint, listen=True)
    if kind == "unix":
        return True
    assert isinstance(where, tuple)
    host = where[0]
    if host == "localhost":
        return True
    import ipaddress  # noqa: PLC0415 - only for the standalone sidecar's listen check

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Seatbelt (SBPL) profile text for the vz backend's sandbox-exec modes (DESIGN §6). Pure.

Network-deny puts `(deny network-outbound)` *after* `(allow default)` (SBPL: the last matching
rule wins), then re-allows exactly the host bridge and DNS stub ports on loopback, IPv4 and IPv6.
sandbox-exec rejects a portless loopback rule, and one would open every loopback service anyway,
so a port is mandatory. Home masks deny both reading and writing below `<HOME>/<p>`."""

from __future__ import annotations


from ..errors import BackendError
from .record import record

NETWORK_DENY_COMMENT = "; macOS structural: deny all outbound, allow only Firma loopback endpoints"


def parse_port(value: str) -> int:
    """The port of `http://H:P[/path][?q]`, `H:P` or `http://[v6]:P` (DESIGN §6 table).

    Raises BackendError("vz", …) when there is no port or it is not 1..65535 in decimal."""
    rest = value
    scheme_end = rest.find("://")
    if scheme_end >= 0:
        rest = rest[scheme_end + 3 :]
    for sep in "/?#":
        cut = rest.find(sep)
        if cut >= 0:
            rest = rest[:cut]
    if rest.startswith("["):
        close = rest.find("]")
        port_text = rest[close + 2 :] if close >= 0 and rest[close + 1 : close + 2] == ":" else ""
    else:
        _host, sep, port_text = rest.rpartition(":")
        if not sep:
            port_text = ""
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
        raise BackendError(
            "vz",
            f"cannot derive a loopback port from {value!r}; the host bridge and DNS stub must "
            "be host:port addresses",
        )
    return int(port_text)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


@record
class SbplInput:
    network_deny: bool
    # Ports of the host bridge and the host DNS stub; required (non-empty) for network_deny.
    loopback_ports: tuple[int, ...] = ()
    home: str = ""
    mask_home_paths: tuple[str, ...] = ()  # relative to home


def render_sbpl(spec: SbplInput) -> str:
    """The profile text, one rule per line, newline-terminated."""
    lines = ["(version 1)", "(allow default)"]
    if spec.network_deny:
        ports = sorted(set(spec.loopback_ports))
        if not ports:
            raise BackendError(
                "vz",
                "network-deny profile needs the bridge and DNS stub ports; refusing a profile "
                "that would allow no Firma endpoint",
            )
        for p in ports:
            if not isinstance(p, int) or isinstance(p, bool) or not 0 < p <= 65535:
                raise BackendError("vz", f"invalid loopback port {p!r} for the network-deny profile")
        lines.append(NETWORK_DENY_COMMENT)
        lines.append("(deny network-outbound)")
        for p in ports:
            lines.append(f'(allow network-outbound (remote ip4 "localhost:{p}"))')
            lines.append(f'(allow network-outbound (remote ip6 "localhost:{p}"))')
    if spec.mask_home_paths:
        home = spec.home.rstrip("/")
        if not home.startswith("/"):
            raise BackendError("vz", f"home masks need an absolute home directory, got {spec.home!r}")
        for rel in spec.mask_home_paths:
            rel = rel.strip("/")
            if not rel or ".." in rel.split("/"):
                raise BackendError("vz", f"invalid masked home path {rel!r}")
            path = _quote(f"{home}/{rel}")
            lines.append(f'(deny file-read* (subpath "{path}"))')
            lines.append(f'(deny file-write* (subpath "{path}"))')
    return "\n".join(lines) + "\n"


def sandbox_exec_argv(sandbox_exec: str, profile: str, executable: str, args: tuple[str, ...]) -> list[str]:
    """`sandbox-exec -p <profile> <exe> <args…>`."""
    return [sandbox_exec, "-p", profile, executable, *args]

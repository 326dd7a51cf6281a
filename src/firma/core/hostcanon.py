"""Host canonicalization (DESIGN §9): one spelling per destination, used for the decision *and*
the dial. Pure; raises HostError (reason `invalid_host`) for anything ambiguous."""

from __future__ import annotations

import ipaddress
import re

from .record import record

MAX_HOST = 255
_FORBIDDEN = set("\x00\r\n%@/\\?#") | {chr(c) for c in range(0x20)} | {" ", "\x7f"}
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class HostError(ValueError):
    reason = "invalid_host"


@record
class CanonHost:
    host: str  # lower-case DNS name, dotted-quad IPv4, or compressed IPv6 without brackets
    kind: str  # "name" | "ipv4" | "ipv6"

    @property
    def is_ip(self) -> bool:
        return self.kind != "name"

    def authority(self, port: int) -> str:
        return f"[{self.host}]:{port}" if self.kind == "ipv6" else f"{self.host}:{port}"


def _inet_aton(parts: list[str]) -> str:
    """Every inet_aton spelling: 1-4 parts, decimal/0x hex/0-octal, the last filling the rest."""
    nums = []
    for p in parts:
        if p[:2].lower() == "0x":
            n = int(p[2:] or "0", 16)
        elif len(p) > 1 and p[0] == "0":
            if any(c not in "01234567" for c in p):
                raise HostError(f"invalid octal IPv4 part {p!r}")
            n = int(p, 8)
        else:
            n = int(p, 10)
        nums.append(n)
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise HostError("IPv4 part out of range")
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


def canon_host(raw: str) -> CanonHost:
    if not isinstance(raw, str) or raw == "":
        raise HostError("empty host")
    if len(raw) > MAX_HOST + 2:
        raise HostError("host longer than 255")
    if any(c in _FORBIDDEN for c in raw):
        raise HostError("host contains a forbidden character")
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise HostError("unterminated IPv6 literal")
        try:
            ip6 = ipaddress.IPv6Address(raw[1:-1])
        except ValueError as exc:
            raise HostError(f"invalid IPv6 literal: {exc}") from None
        return CanonHost(ip6.compressed, "ipv6")
    if ":" in raw:
        try:
            return CanonHost(ipaddress.IPv6Address(raw).compressed, "ipv6")
        except ValueError:
            raise HostError("host contains ':'") from None
    host = raw
    if not host.isascii():
        import idna  # noqa: PLC0415 - only for non-ASCII or xn-- names (launch latency: most runs never need it)

        # Map first (UTS 46: full-width digits and dots, case), then classify the ASCII result, so
        # "１２７.０.０.１" is the IPv4 address it maps to, never a name.
        try:
            host = idna.encode(host.rstrip(".\u3002\uff0e\uff61"), uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise HostError(f"invalid IDNA name: {exc}") from None
        if any(c in _FORBIDDEN for c in host):
            raise HostError("host contains a forbidden character")
    host = host[:-1] if host.endswith(".") else host
    if host == "" or host.startswith(".") or ".." in host:
        raise HostError("empty label")
    parts = host.split(".")
    # WHATWG rule: a numeric last label means the whole host must be an IPv4 address.
    if _NUMERIC.match(parts[-1]):
        if len(parts) > 4 or not all(_NUMERIC.match(p) for p in parts):
            raise HostError("malformed IPv4 address")
        return CanonHost(_inet_aton(parts), "ipv4")
    name = host.lower()
    if name.startswith("xn--") or ".xn--" in name:
        import idna  # noqa: PLC0415 - see above

        try:
            name = idna.encode(idna.decode(name)).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise HostError(f"invalid IDNA label: {exc}") from None
    if len(name) > MAX_HOST - 2:
        raise HostError("host longer than 253")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise HostError(f"invalid label {label!r}")
    return CanonHost(name, "name")


def split_authority(authority: str, default_port: int | None) -> tuple[CanonHost, int]:
    """`host[:port]` / `[v6][:port]` → (canonical host, port). No userinfo, no bare IPv6."""
    if "@" in authority:
        raise HostError("userinfo in authority")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HostError("unterminated IPv6 literal")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise HostError("junk after IPv6 literal")
        port_part = rest[1:] if rest else None
    elif authority.count(":") > 1:
        raise HostError("IPv6 literal without brackets")
    elif ":" in authority:
        host_part, port_part = authority.split(":", 1)
    else:
        host_part, port_part = authority, None
    if port_part is None:
        if default_port is None:
            raise HostError("port required")
        port = default_port
    else:
        if not port_part.isdigit() or not port_part.isascii() or len(port_part) > 5:
            raise HostError("invalid port")
        port = int(port_part)
        if not 1 <= port <= 65535:
            raise HostError("port out of range")
    return canon_host(host_part), port

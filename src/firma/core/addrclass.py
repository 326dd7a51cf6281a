"""Address classes the sidecar refuses to dial unless host:port is allowed exactly (DESIGN §9).

`forbidden_class(ip)` names why an address is not a public destination, looking through
IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms to the IPv4 address inside. Pure."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_N4 = ipaddress.IPv4Network
_N6 = ipaddress.IPv6Network

# Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, Alibaba, AWS IPv6, Oracle).
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("168.63.129.16"),
    ipaddress.ip_address("192.0.0.192"),
    ipaddress.ip_address("fd00:ec2::254"),
}

_V4 = [
    (_N4("0.0.0.0/8"), "unspecified"),
    (_N4("127.0.0.0/8"), "loopback"),
    (_N4("10.0.0.0/8"), "private"),
    (_N4("172.16.0.0/12"), "private"),
    (_N4("192.168.0.0/16"), "private"),
    (_N4("169.254.0.0/16"), "link_local"),
    (_N4("100.64.0.0/10"), "cgnat"),
    (_N4("198.18.0.0/15"), "benchmarking"),  # also firma's synthetic names (core.synthetic)
    (_N4("224.0.0.0/4"), "multicast"),
    (_N4("240.0.0.0/4"), "reserved"),
]

_V6 = [
    (_N6("::/128"), "unspecified"),
    (_N6("::1/128"), "loopback"),
    (_N6("fe80::/10"), "link_local"),
    (_N6("fec0::/10"), "private"),
    (_N6("fc00::/7"), "private"),
    (_N6("ff00::/8"), "multicast"),
    (_N6("2001::/32"), "teredo"),  # embeds an obfuscated client IPv4: never a plain destination
    (_N6("64:ff9b:1::/48"), "nat64_local"),
]

_MAPPED = _N6("::ffff:0:0/96")
_COMPAT = _N6("::/96")
_NAT64 = _N6("64:ff9b::/96")
_6TO4 = _N6("2002::/16")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    n = int(ip)
    if ip in _MAPPED:
        return "mapped", ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if ip in _NAT64:
        return "nat64", ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if ip in _6TO4:
        return "6to4", ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    if ip in _COMPAT and n > 1:
        return "compat", ipaddress.IPv4Address(n & 0xFFFFFFFF)
    return None


def forbidden_class(ip: IPAddress | str) -> str | None:
    """None for a public unicast address, else the class name (e.g. `metadata`, `6to4:private`)."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if ip in METADATA:
        return "metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link_local"
        inner = embedded_ipv4(ip)
        if inner is not None:
            form, v4 = inner
            sub = forbidden_class(v4)
            return f"{form}:{sub}" if sub else None
        for net, name in _V6:
            if ip in net:
                return name
    else:
        for net4, name in _V4:
            if ip in net4:
                return name
    if not ip.is_global:  # documentation, benchmarking, other IANA special-purpose ranges
        return "reserved"
    return None

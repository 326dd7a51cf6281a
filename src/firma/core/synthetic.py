"""Synthetic addresses for allowed names (DESIGN §5.4). Pure.

Inside the sandbox the DNS stub answers a name the policy could allow with an address from a
reserved range, one per name for the run, and nothing real is resolved inside. A connection to
that address is the name it stands for: the sidecar resolves the real name on the host, with
every address check it makes for a proxy request. The ranges are the benchmarking block
198.18.0.0/15 (RFC 2544, never routed) and a unique-local /64; neither leaves the sandbox, whose
network namespace has only `lo`, where every address is local."""

from __future__ import annotations

import ipaddress

from . import egress

SYNTHETIC_V4 = ipaddress.IPv4Network(egress.SYNTHETIC_V4)
SYNTHETIC_V6 = ipaddress.IPv6Network(egress.SYNTHETIC_V6)
MAX_NAMES = 65_536  # one run's distinct names; beyond, new names are refused (and audited)
TTL = 300


class SyntheticNames:
    """One run's name <-> address table (the services process's; not shared between runs)."""

    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self._max = max_names
        self._by_name: dict[str, int] = {}
        self._names: list[str] = []

    def __len__(self) -> int:
        return len(self._names)

    def index_of(self, name: str) -> int | None:
        """The name's index, assigned on first use; None once the table is full."""
        i = self._by_name.get(name)
        if i is None:
            if len(self._names) >= self._max:
                return None
            i = len(self._names)
            self._by_name[name] = i
            self._names.append(name)
        return i

    def addresses(self, name: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address] | None:
        i = self.index_of(name)
        if i is None:
            return None
        # skip the network's first address (.0) so no answer is an all-zero host part
        return SYNTHETIC_V4[i + 1], SYNTHETIC_V6[i + 1]

    def name_of(self, address: str) -> str | None:
        """The name a synthetic address stands for; None for any other address (an IP literal)
        or one this run never handed out."""
        ip = _synthetic_ip(address)
        if ip is None:
            return None
        net = SYNTHETIC_V4 if ip.version == 4 else SYNTHETIC_V6
        i = int(ip) - int(net.network_address) - 1
        return self._names[i] if 0 <= i < len(self._names) else None


def _synthetic_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`address` (a zone and an IPv4-mapped form undone) when it lies in a synthetic range."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip if ip in (SYNTHETIC_V4 if ip.version == 4 else SYNTHETIC_V6) else None


def is_synthetic(address: str) -> bool:
    return _synthetic_ip(address) is not None

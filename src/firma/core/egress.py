"""Transparent egress planning (DESIGN §5.4), pure: which ports get a planted listener on every
address inside the sandbox.

80 and 443 when anything could be allowed (an allow pattern, `allow_tcp`, a Cedar policy, monitor
mode, or an external sidecar whose rules firma does not know), and every port an allow rule
names. The DNS stub's 53 and the proxy's 18080 stay theirs: a rule naming one of them is reached
through the proxy only."""

from __future__ import annotations

from ..errors import ConfigError
from .policy import parse_pattern

# The synthetic ranges the DNS stub answers from (core.synthetic; strings here, so the launcher
# does not import ipaddress).
SYNTHETIC_V4 = "198.18.0.0/15"
SYNTHETIC_V6 = "fd66:6972:6d61::/64"  # unique-local; "firma" in the global ID
RESERVED_PORTS = frozenset({53, 18080})
DEFAULT_PORTS = (80, 443)


def transparent_ports(allow: tuple[str, ...], *, cedar: bool, monitor: bool, external: bool) -> tuple[int, ...]:
    """`allow`: the run's allow_hosts and allow_tcp patterns."""
    ports: set[int] = set()
    if allow or cedar or monitor or external:
        ports.update(DEFAULT_PORTS)
    for text in allow:
        port = parse_pattern(text).port
        if port is not None:
            ports.add(port)
    out = tuple(sorted(ports - RESERVED_PORTS))
    if len(out) > MAX_PORTS:
        raise ConfigError(f"the allow rules name {len(out)} ports; transparent egress plants at most {MAX_PORTS}: "
                          "allow fewer ports, or reach the others through the proxy")
    return out


MAX_PORTS = 64  # two listeners each, passed in one SCM_RIGHTS message (the kernel allows 253 fds)


def local_default_routes(fib_trie: str, ipv6_route: str) -> tuple[bool, bool]:
    """Whether `local 0.0.0.0/0` (the local table of /proc/<pid>/net/fib_trie) and `local ::/0`
    (/proc/<pid>/net/ipv6_route, flag RTF_LOCAL) are in a namespace's routes, read from outside."""
    v4 = False
    local = fib_trie.split("\nLocal:", 1)
    if len(local) == 2:
        lines = [ln.strip() for ln in local[1].splitlines()]
        v4 = any(a == "|-- 0.0.0.0" and b == "/0 host LOCAL" for a, b in zip(lines, lines[1:], strict=False))
    v6 = False
    for line in ipv6_route.splitlines():
        f = line.split()
        if len(f) == 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] == "lo":
            try:
                v6 = v6 or bool(int(f[8], 16) & 0x80000000)  # RTF_LOCAL
            except ValueError:
                pass
    return v4, v6


def listening(tcp: str, tcp6: str) -> frozenset[tuple[str, int]]:
    """(address, port) of the listening TCP sockets in /proc/<pid>/net/tcp and tcp6: "0.0.0.0",
    "::", or another address's hex as the kernel prints it."""
    out: set[tuple[str, int]] = set()
    for text, any_addr in ((tcp, "0.0.0.0"), (tcp6, "::")):
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) < 4 or f[3] != "0A":  # TCP_LISTEN
                continue
            addr, _, port = f[1].rpartition(":")
            try:
                out.add((any_addr if set(addr) == {"0"} else addr, int(port, 16)))
            except ValueError:
                continue
    return frozenset(out)

"""Host-loopback listeners answer only their owner (DESIGN §9 "Owner-only host services").

A loopback TCP port or UDP port is reachable by every local user. For the runner and vz
backends the bridge and the DNS stub listen there, so each connection and each datagram is
attributed to the uid of the socket it came from, looked up exactly with the kernel's sock_diag
(inet_diag) interface through pyroute2: the peer socket is the one whose source port is the
peer's and (TCP) whose destination port is ours. Anything not the owner's — or not found, which
is what a socket closed meanwhile looks like — is refused and counted, never audited line by line
(another user must not be able to fill the owner's audit)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sys
from typing import Any

_TCP_ESTABLISHED = 1 << 1
_ALL_STATES = 0xFFF


class PeerUids:
    """Blocking lookups on one netlink socket, all on one thread of their own: pyroute2's
    synchronous API drives an event loop of its own, which cannot run on the services' loop
    thread and stays bound to the thread that made it."""

    def __init__(self, owner_uid: int) -> None:
        self.owner_uid = owner_uid
        self.refused = 0  # connections and datagrams from anyone else
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="firma-peers")
        self._diag: Any = None

    def _sock(self) -> Any:
        if self._diag is None:
            # `firma` keeps `ssl` out of the process for launch latency (cli.main.entry), and
            # pyroute2 imports it unconditionally: let it in for this import.
            if "ssl" in sys.modules and sys.modules["ssl"] is None:
                del sys.modules["ssl"]
            from pyroute2.netlink.diag import DiagSocket  # type: ignore[import-untyped]  # noqa: PLC0415 - ~150 ms import: host-loopback backends only

            diag = DiagSocket()
            diag.bind()
            self._diag = diag
        return self._diag

    def lookup(self, proto: int, family: int, peer_port: int, local_port: int | None) -> int | None:
        """The uid owning the socket bound to `peer_port` (and, for TCP, connected to
        `local_port`) on loopback; None when there is no such socket."""
        rows = self._sock().get_sock_stats(
            family=family, protocol=proto,
            states=_TCP_ESTABLISHED if proto == socket.IPPROTO_TCP else _ALL_STATES,
            sport=peer_port, dport=local_port or 0,
        )
        uids = {r["idiag_uid"] for r in rows if r.get("idiag_sport") == peer_port}
        return uids.pop() if len(uids) == 1 else None

    async def uid_of(self, proto: int, peer: tuple, local: tuple | None) -> int | None:
        """The peer's uid (None when it cannot be told), looked up off the event loop."""
        family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, self.lookup, proto, family, peer[1], local[1] if local else None
            )
        except Exception:  # noqa: BLE001 - a lookup that fails attributes nothing (refused)
            return None

    async def allows(self, proto: int, peer: tuple, local: tuple | None) -> bool:
        """True when the peer is one of the owner's sockets; counts a refusal otherwise."""
        family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        try:
            uid = await asyncio.get_running_loop().run_in_executor(
                self._thread, self.lookup, proto, family, peer[1], local[1] if local else None
            )
        except Exception:  # noqa: BLE001 - a lookup that fails refuses (fail closed)
            uid = None
        if uid == self.owner_uid:
            return True
        self.refused += 1
        return False

    def warm(self) -> None:
        """Open the netlink socket now (and import pyroute2) so the first request does not wait;
        raises when sock_diag is unavailable, which refuses the launch."""
        self._thread.submit(self._sock).result()

    def close(self) -> None:
        def shut() -> None:
            if self._diag is not None:
                self._diag.close()
                self._diag = None

        self._thread.submit(shut).result()
        self._thread.shutdown(wait=True)

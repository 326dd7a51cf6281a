"""Plant listening sockets inside a sandbox's network namespace (ARCHITECTURE "The one idea").

A forked, single-threaded helper joins the sandbox's user namespace (when it differs from ours:
there it holds CAP_NET_BIND_SERVICE, so port 53 works unprivileged) and network namespace, binds
the proxy and DNS sockets, hands the descriptors back over a socketpair (SCM_RIGHTS) and exits.
The sockets stay in the sandbox's namespace; the launcher serves them from outside, so nothing of
ours runs inside the sandbox.

It also adds the local default routes that make every address local inside (transparent egress,
DESIGN §5.4) and plants a listener on every address for each transparent port.

The child only makes syscalls (setns, socket, bind, listen, sendmsg, _exit), which is safe after
fork even when the launcher has threads."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import time

from ..base import PlantedSockets
from ...core import rtnl
from ...core.model import PLANTED_DNS_ADDR, PLANTED_PROXY_ADDR
from ...core.record import record
from ...errors import LaunchError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1): the user namespace that owns a namespace
_HELPER_TIMEOUT = 10.0
# bwrap reports the sandbox's pid before its child has finished setting up `lo` (up, without
# 127.0.0.1 yet, a bind fails with EADDRNOTAVAIL); planting waits for the address rather than bringing `lo` up itself,
# which would make bwrap's own setup fail. Bounded well below the helper's timeout.
_LOOPBACK_WAIT = 5.0


@record
class Addresses:
    proxy: tuple[str, int] = PLANTED_PROXY_ADDR
    dns: tuple[str, int] = PLANTED_DNS_ADDR
    # Transparent egress (DESIGN §5.4): a listener on 0.0.0.0:P and [::]:P for each port, behind
    # `local 0.0.0.0/0` and `local ::/0` routes on `lo` (every address is local inside).
    transparent_ports: tuple[int, ...] = ()


def add_local_routes(v6: bool) -> bytes:
    """In the sandbox's network namespace (the helper, after setns): the local default routes.
    b"" when added; otherwise why, for the launcher's one-line error."""
    lo = socket.if_nametoindex("lo")
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        nl.bind((0, 0))
        seq = 0
        for family in (socket.AF_INET, socket.AF_INET6) if v6 else (socket.AF_INET,):
            # bwrap gives `lo` its address before it brings the link up (and IPv6 follows the
            # link): ENETDOWN until then. Bounded like the bind above.
            deadline = time.monotonic() + _LOOPBACK_WAIT
            while True:
                seq += 1
                nl.send(rtnl.local_default_route(family, lo, seq))
                err = rtnl.ack_errno(nl.recv(65536), seq)
                if err != errno.ENETDOWN or time.monotonic() > deadline:
                    break
                time.sleep(0.0005)
            if err:
                return b"local route (%s): %s" % (b"IPv6" if family == socket.AF_INET6 else b"IPv4", os.strerror(err).encode())
            if err is None:
                return b"local route: no acknowledgement from the kernel"
    finally:
        nl.close()
    return b""


def _transparent_listeners(ports: tuple[int, ...], v6: bool) -> list[socket.socket]:
    out = []
    for port in ports:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s4.bind(("0.0.0.0", port))
        s4.listen(1024)
        out.append(s4)
        if v6:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s6.bind(("::", port))
            s6.listen(1024)
            out.append(s6)
    return out


def _libc_setns():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _libc_prctl():
    fn = ctypes.CDLL(None, use_errno=True).prctl
    fn.restype = ctypes.c_int
    return fn


def keep_only(keep: tuple[int, ...]) -> None:
    """In a forked helper, first thing: close every descriptor but `keep`, with 0-2 on /dev/null.
    A helper holds nothing of the launcher's: not its terminal or output pipes, and not a pipe
    another launcher thread reads to its end (the limits thread's rlimit helper: a long-lived
    --publish helper holding its write end hung the launch for good)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(null, fd)
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _ns_ino(path: str) -> int:
    return os.stat(path).st_ino


def plant(pid: int, addrs: Addresses = Addresses()) -> PlantedSockets:
    """Create the planted listeners in the network namespace of `pid` (blocking, a few ms)."""
    setns = _libc_setns()  # resolve before fork
    try:
        net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        # Join the user namespace that *owns* the network namespace, not the one the process is
        # in right now: with --disable-userns bwrap moves into a nested user namespace, where
        # we would hold no capability over the network namespace.
        try:
            user_fd = fcntl.ioctl(net_fd, NS_GET_USERNS)
        except OSError:
            os.close(net_fd)
            raise
        os.set_inheritable(user_fd, False)
    except OSError as exc:
        raise LaunchError(f"cannot open namespaces of sandbox pid {pid}: {exc.strerror}; the sandbox exited early") from None
    try:
        join_user = os.fstat(user_fd).st_ino != _ns_ino("/proc/self/ns/user")
        if os.fstat(net_fd).st_ino == _ns_ino("/proc/self/ns/net"):
            raise LaunchError("sandbox shares the launcher's network namespace; refusing to plant sockets")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the forked helper
            code = 1
            try:
                keep_only((child.fileno(), user_fd, net_fd))
                if join_user and setns(user_fd, CLONE_NEWUSER) != 0:
                    child.send(b"ERR setns(user) errno %d" % ctypes.get_errno())
                    os._exit(2)
                if setns(net_fd, CLONE_NEWNET) != 0:
                    child.send(b"ERR setns(net) errno %d" % ctypes.get_errno())
                    os._exit(3)
                proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _bind_when_loopback_is_up(proxy, addrs.proxy)
                proxy.listen(128)
                dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                _bind_when_loopback_is_up(dns_udp, addrs.dns)
                dns_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                dns_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _bind_when_loopback_is_up(dns_tcp, addrs.dns)
                dns_tcp.listen(64)
                extra: list[socket.socket] = []
                v6 = os.path.exists("/proc/sys/net/ipv6") and socket.has_ipv6
                why = add_local_routes(v6)
                if why:
                    child.send(b"ERR " + why)
                    os._exit(4)
                extra = _transparent_listeners(addrs.transparent_ports, v6)
                socket.send_fds(child, [b"OK v6" if v6 else b"OK"],
                                [proxy.fileno(), dns_udp.fileno(), dns_tcp.fileno(), *(x.fileno() for x in extra)])
                code = 0
            except BaseException as exc:  # noqa: BLE001 - report anything, then exit
                try:
                    child.send(b"ERR " + repr(exc).encode()[:512])
                except BaseException:  # noqa: BLE001 - the planting child reports any failure on its pipe and exits
                    pass
            finally:
                os._exit(code)
        child.close()
        try:
            parent.settimeout(_HELPER_TIMEOUT)
            msg, fds, _flags, _addr = socket.recv_fds(parent, 1024, 3 + 2 * len(addrs.transparent_ports))
        except (OSError, TimeoutError) as exc:
            os.kill(helper, 9)
            raise LaunchError(f"planting helper did not answer: {exc}") from None
        finally:
            parent.close()
            os.waitpid(helper, 0)
    finally:
        os.close(user_fd)
        os.close(net_fd)
    v6 = msg == b"OK v6"
    want = 3 + len(addrs.transparent_ports) * (2 if v6 else 1)
    if msg not in (b"OK", b"OK v6") or len(fds) != want:
        for fd in fds:
            os.close(fd)
        raise LaunchError(
            f"could not plant sockets in the sandbox network namespace: {msg.decode(errors='replace')}"
        )
    socks = [socket.socket(fileno=fd) for fd in fds]
    for s in socks:
        s.setblocking(False)
    return PlantedSockets(proxy_tcp=socks[0], dns_udp=socks[1], dns_tcp=socks[2], transparent=tuple(socks[3:]), ipv6=v6)


def _bind_when_loopback_is_up(sock: socket.socket, addr: tuple[str, int]) -> None:
    """Bind `addr`, waiting while the namespace's loopback address does not exist yet."""
    deadline = time.monotonic() + _LOOPBACK_WAIT
    while True:
        try:
            sock.bind(addr)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                raise
        time.sleep(0.0005)


def netns_interfaces(pid: int) -> list[str]:
    """Interface names in the network namespace of `pid`, read from outside."""
    with open(f"/proc/{pid}/net/dev") as f:
        lines = f.read().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


def socket_factory(pid: int) -> tuple[int, socket.socket]:
    """(helper pid, control socket): a helper in the sandbox's user and network namespaces that,
    for each byte it reads, hands back one unconnected TCP socket of that network namespace
    (`--publish`: the services process connects it to the agent's port inside, from outside).
    It makes nothing else, ends at EOF on the control socket, and dies with the launcher."""
    setns, prctl = _libc_setns(), _libc_prctl()  # resolved before the fork
    try:
        net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        user_fd = fcntl.ioctl(net_fd, NS_GET_USERNS)
        os.set_inheritable(user_fd, False)
    except OSError as exc:
        raise LaunchError(f"cannot open namespaces of sandbox pid {pid}: {exc.strerror}; the sandbox exited early") from None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        join_user = os.fstat(user_fd).st_ino != _ns_ino("/proc/self/ns/user")
        launcher = os.getpid()
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the forked helper
            try:
                prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
                keep_only((child.fileno(), user_fd, net_fd))
                if os.getppid() != launcher:
                    os._exit(1)
                if (join_user and setns(user_fd, CLONE_NEWUSER) != 0) or setns(net_fd, CLONE_NEWNET) != 0:
                    os._exit(2)
                child.send(b"OK")
                while child.recv(1):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socket.send_fds(child, [b"S"], [s.fileno()])
                    s.close()
            except BaseException:  # noqa: BLE001 - the helper only ever exits
                pass
            finally:
                os._exit(0)
        child.close()
        parent.settimeout(_HELPER_TIMEOUT)
        try:
            ok = parent.recv(8)
        except OSError:
            ok = b""
        if ok != b"OK":
            parent.close()
            os.kill(helper, 9)
            os.waitpid(helper, 0)
            raise LaunchError("could not start the --publish helper in the sandbox's network namespace")
        parent.settimeout(None)
        return helper, parent
    finally:
        os.close(user_fd)
        os.close(net_fd)

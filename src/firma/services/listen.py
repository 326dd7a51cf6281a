"""Sidecar readiness without an event loop (SPEC §9: policy loaded, audit key open, listener
bound), for the synchronous launcher of firma.run.forked and the asyncio sidecar alike.

`bind_unix_listener` makes the embedded sidecar's private socket; `probe` asks a running
(external) sidecar for its health answer."""

from __future__ import annotations

import os
import socket
import stat

from ..core.endpoint import HEALTH_PATH, parse_endpoint
from ..errors import SidecarError

LISTEN_BACKLOG = 1024


def bind_unix_listener(path: str) -> socket.socket:
    """A listening unix socket at path, mode 0600 (made under umask 077, so never wider even for
    an instant). A stale socket from a crashed run is replaced; any other file is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SidecarError(f"{path} exists and is not a socket; choose another --listen path")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise SidecarError(f"cannot listen on unix://{path}: {exc.strerror}; choose another --listen path") from None
    finally:
        os.umask(old)
    return sock


def probe(endpoint: str, timeout: float) -> None:
    """Raise SidecarError unless a sidecar answers its health request at endpoint in time."""
    kind, addr = parse_endpoint(endpoint)
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(addr, timeout)  # type: ignore[arg-type]
    except OSError as exc:
        raise SidecarError(f"sidecar {endpoint} is not reachable: {exc or 'timed out'}") from None
    with sock:
        try:
            sock.sendall(f"GET {HEALTH_PATH} HTTP/1.1\r\nhost: firma\r\n\r\n".encode())
            line = b""
            while b"\n" not in line and len(line) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                line += chunk
        except OSError as exc:
            raise SidecarError(f"sidecar {endpoint} did not answer: {exc or 'timed out'}") from None
    if not line.startswith(b"HTTP/1.1 200"):
        first = line.partition(b"\n")[0]
        raise SidecarError(f"sidecar {endpoint} did not report ready (got {first[:40]!r})")

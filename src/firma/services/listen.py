"""The embedded sidecar's private unix socket, bound without an event loop (DESIGN §9 readiness), for
the synchronous launcher of firma.run.forked and the asyncio sidecar alike."""

from __future__ import annotations

import os
import socket
import stat

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

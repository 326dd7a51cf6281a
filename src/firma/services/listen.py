"""The embedded sidecar's private unix socket, bound without an event loop (DESIGN §9 readiness), for
the synchronous launcher of firma.run.forked and the asyncio sidecar alike."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from typing import Iterator

from ..errors import SidecarError

LISTEN_BACKLOG = 1024
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


@contextlib.contextmanager
def short_unix_path(path: str) -> Iterator[str]:
    """A name for `path` that fits a socket address: the path itself, or, when it is too long,
    `/proc/self/fd/<dirfd>/<name>` through a descriptor of its directory opened without
    following a final link. The socket is never placed elsewhere (a shorter directory such as
    $TMPDIR could be visible inside a sandbox)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    name = os.path.basename(path)
    try:
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SidecarError(f"cannot open the socket directory of {path}: {exc.strerror}") from None
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


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
        with short_unix_path(path) as short:
            sock.bind(short)
            sock.listen(LISTEN_BACKLOG)
            os.chmod(short, 0o600)
    except OSError as exc:
        sock.close()
        raise SidecarError(f"cannot listen on unix://{path}: {exc.strerror}; choose another --listen path") from None
    finally:
        os.umask(old)
    return sock

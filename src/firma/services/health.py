"""The one health prober: does a sidecar answer its health request at an endpoint? Used by
`firma run` (an external sidecar before launch, the embedded one in the in-process hosting),
`firma doctor` and the tests. Synchronous (the synchronous launcher has no event loop);
`probe_async` runs it off an event loop's thread."""

from __future__ import annotations

import socket
from typing import Any

from ..core.endpoint import HEALTH_PATH, parse_endpoint
from ..errors import SidecarError
from .listen import short_unix_path


def probe(endpoint: str, timeout: float, tls: Any = None) -> None:
    """Raise SidecarError unless a sidecar answers `GET HEALTH_PATH` with 200 at endpoint in time.
    `tls`: an SSLContext for a sidecar that requires client certificates."""
    kind, addr = parse_endpoint(endpoint)
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                assert isinstance(addr, str)
                with short_unix_path(addr) as short:
                    sock.connect(short)
            except (OSError, SidecarError):
                sock.close()
                raise
        else:
            assert isinstance(addr, tuple)
            sock = socket.create_connection(addr, timeout)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=addr[0])
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


async def probe_async(endpoint: str, timeout: float, tls: Any = None) -> None:
    """`probe` from a coroutine, without blocking the event loop (which may serve the sidecar)."""
    import asyncio  # noqa: PLC0415 - the synchronous launcher never imports asyncio

    await asyncio.to_thread(probe, endpoint, timeout, tls)

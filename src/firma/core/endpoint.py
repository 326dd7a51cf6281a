"""Sidecar endpoints as text: `tcp://HOST:PORT` and `unix:///PATH` (pure)."""

from __future__ import annotations

from ..errors import SidecarError

HEALTH_PATH = "/__firma/health"  # a sidecar answers GET here with 200 once it serves


def parse_endpoint(endpoint: str) -> tuple[str, str | tuple[str, int]]:
    """`tcp://H:P` → ("tcp", (H, P)); `unix:///P` → ("unix", P)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/"):
            raise SidecarError(f"invalid endpoint {endpoint!r}: unix:// needs an absolute path (unix:///run/x.sock)")
        return "unix", path
    if endpoint.startswith("tcp://"):
        hp = endpoint[len("tcp://") :].rstrip("/")
        if hp.startswith("["):
            host, _, port = hp[1:].partition("]:")
        else:
            host, _, port = hp.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise SidecarError(f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT")
        return "tcp", (host, int(port))
    raise SidecarError(f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT or unix:///PATH")

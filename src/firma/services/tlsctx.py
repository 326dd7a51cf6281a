"""TLS contexts for the sidecar's client authentication (DESIGN §9 "Standalone sidecar"): the
standalone sidecar requires a client certificate from a CA the operator names; `firma run`'s
bridge presents one; HTTPS inspection (DESIGN §5.7) loads `ssl` through it too. `firma` keeps the `ssl` module out of the process for launch latency
(cli.main.entry), so it is let in here, only when TLS is configured."""

from __future__ import annotations

import sys
from typing import Any

from ..errors import SidecarError


def load_ssl() -> Any:
    """The `ssl` module, let into a process that kept it out (and asyncio told it exists)."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
    import ssl  # noqa: PLC0415 - only with client authentication configured

    # asyncio's modules imported while `ssl` was kept out hold `ssl = None` (and sslproto skipped
    # the definitions that need it): reload sslproto in place — the others reach it through the
    # module — and point the rest at `ssl` now that it is wanted.
    proto = sys.modules.get("asyncio.sslproto")
    if proto is not None and getattr(proto, "ssl", None) is None:
        import importlib  # noqa: PLC0415 - only in this repair

        importlib.reload(proto)
    for name in ("asyncio.base_events", "asyncio.selector_events", "asyncio.streams"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "ssl", "absent") is None:
            mod.ssl = ssl  # type: ignore[attr-defined]
    return ssl


def server_context(cert: str, key: str, client_ca: str) -> Any:
    """TLS 1.2+ server context that requires a client certificate signed by `client_ca`."""
    ssl = load_ssl()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise SidecarError(f"cannot load the sidecar's TLS files ({cert}, {key}, {client_ca}): {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str) -> Any:
    """TLS client context presenting `cert`, trusting only `ca` for the sidecar's certificate."""
    ssl = load_ssl()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SidecarError(f"cannot load the sidecar client TLS files ({cert}, {key}, {ca}): {exc}; fix [run].sidecar_tls") from None
    return ctx


def for_sidecar(tls: Any) -> Any:
    """The client context for a `SidecarChoice.tls` (None when no TLS is configured)."""
    return None if tls is None else client_context(tls.cert, tls.key, tls.ca)

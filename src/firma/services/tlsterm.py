"""TLS on both legs of an inspected connection (DESIGN §5.7): the agent's side terminated with a
leaf of firma's CA, the upstream's side verified against the host's trust store.

The agent's ClientHello has already been read (its SNI decided the connection), so the
termination replays those bytes into the TLS layer before the socket's next ones."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast

from . import netio

ALPN = ["http/1.1"]  # h2 and gRPC are not inspected: such clients fall back or belong in no_inspect


class TlsFailed(Exception):
    """A handshake that did not complete: `reason` is a short code for the audit, `detail` the
    verifier's words for the 502 body."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Replay:
    """The agent's transport as start_tls sees it: when reading resumes, the bytes the sidecar
    already read (the ClientHello) reach the TLS layer first. Everything else is the transport."""

    _start_tls_compatible = True

    def __init__(self, raw: asyncio.Transport, early: bytes) -> None:
        self._raw = raw
        self._early = early
        self._proto: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self._proto = protocol
        self._raw.set_protocol(protocol)

    def resume_reading(self) -> None:
        early, self._early = self._early, b""
        if early and self._proto is not None:
            _feed(self._proto, early)
        if not self._raw.is_closing():
            self._raw.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _feed(proto: Any, data: bytes) -> None:
    if isinstance(proto, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(proto.get_buffer(len(view))).cast("B")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    else:
        proto.data_received(data)


async def terminate(s: netio.Stream, context: ssl.SSLContext, timeout: float) -> netio.Stream:
    """The agent's connection `s` (its ClientHello in `s.buf` or still unread) as plaintext, once
    the handshake with `context` completed. TlsFailed when it did not (the agent does not trust
    firma's CA, closed, or took longer than `timeout`)."""
    early, _eof = netio.take_buffered(s)  # the bytes already read belong to the handshake
    raw = cast(asyncio.Transport, s.w.transport)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=netio.STREAM_LIMIT, loop=loop)
    proto = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        app = await loop.start_tls(cast(asyncio.WriteTransport, _Replay(raw, early)), proto, context,
                                   server_side=True, ssl_handshake_timeout=timeout)
    except ssl.SSLError as exc:
        raise TlsFailed("agent_tls_failed", _ssl_words(exc)) from None
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        raise TlsFailed("agent_tls_failed", type(exc).__name__) from None
    if app is None:
        raise TlsFailed("agent_tls_failed", "the agent closed during the handshake")
    proto.connection_made(app)
    writer = asyncio.StreamWriter(app, proto, reader, loop)
    return netio.Stream(reader, writer)


def upstream_context(cafile: str | None = None) -> ssl.SSLContext:
    """Verification as OpenSSL's defaults read it (SSL_CERT_FILE / SSL_CERT_DIR in firma's own
    environment, else the system store), hostname checked, TLS 1.2 at least, ALPN http/1.1.
    There is no option to turn verification off."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


async def dial(addrs: tuple[str, ...], port: int, server_hostname: str, context: ssl.SSLContext,
               timeout: float) -> netio.Stream:
    """A verified TLS connection to the first of `addrs` that answers (exactly the checked
    addresses, in order). TlsFailed with the verifier's reason when the certificate does not
    hold (wrong name, expired, unknown CA); OSError when no address could be reached."""
    last: Exception | None = None
    for ip in addrs:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(ip, port, ssl=context, server_hostname=server_hostname,
                                        limit=netio.STREAM_LIMIT, ssl_handshake_timeout=timeout),
                timeout)
        except ssl.SSLCertVerificationError as exc:
            raise TlsFailed("upstream_certificate_invalid", _ssl_words(exc)) from None
        except ssl.SSLError as exc:
            raise TlsFailed("upstream_tls_failed", _ssl_words(exc)) from None
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
            continue
        netio.nodelay(w)
        return netio.Stream(r, w)
    raise OSError(f"cannot connect to {server_hostname}:{port}: {last or 'no address'}")


def _ssl_words(exc: ssl.SSLError) -> str:
    verify = getattr(exc, "verify_message", None)
    if verify:
        return str(verify)
    return str(exc.reason or exc.strerror or type(exc).__name__)

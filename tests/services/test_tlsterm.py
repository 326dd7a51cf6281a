"""TLS on both legs of an inspected connection (DESIGN §5.7, firma.services.tlsterm): the agent's
handshake completed with the ClientHello the sidecar already read replayed first, and the
upstream dialled verified (hostname, expiry, issuer) with ALPN http/1.1 only. Real Python `ssl`
clients and servers on 127.0.0.1 with trustme certificates."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading

import pytest
import trustme

from firma.core import tlshello
from firma.services import netio, tlsterm
from firma.services.tlsterm import TlsFailed

NAME = "inspected.test"
TIMEOUT = 5.0


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca():
    return trustme.CA()


def server_ctx(ca, *names, **issue) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names, **issue).configure_cert(ctx)
    return ctx


def client_ctx(ca=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(ctx)
    return ctx


async def read_hello(s: netio.Stream) -> bytes:
    """Read the whole ClientHello into s.buf, as the sidecar does before deciding on the SNI."""
    while True:
        try:
            tlshello.parse_client_hello(bytes(s.buf))
            return bytes(s.buf)
        except tlshello.NeedMore:
            pass
        data = await asyncio.wait_for(s.r.read(65536), TIMEOUT)
        if not data:
            raise ConnectionError("closed before the ClientHello")
        s.buf += data


def offered_alpn(hello: bytes) -> list[bytes] | None:
    """The ALPN protocols a ClientHello offers (None: no ALPN extension)."""
    hs = bytearray()
    pos = 0
    while pos < len(hello):
        n = int.from_bytes(hello[pos + 3:pos + 5], "big")
        hs += hello[pos + 5:pos + 5 + n]
        pos += 5 + n
    b = bytes(hs[4:4 + int.from_bytes(hs[1:4], "big")])
    p = 2 + 32
    p += 1 + b[p]
    p += 2 + int.from_bytes(b[p:p + 2], "big")
    p += 1 + b[p]
    end = p + 2 + int.from_bytes(b[p:p + 2], "big")
    p += 2
    while p < end:
        et, el = int.from_bytes(b[p:p + 2], "big"), int.from_bytes(b[p + 2:p + 4], "big")
        data = b[p + 4:p + 4 + el]
        p += 4 + el
        if et == 16:
            out, q = [], 2
            while q < len(data):
                out.append(data[q + 1:q + 1 + data[q]])
                q += 1 + data[q]
            return out
    return None


class Terminator:
    """A loopback server whose accepted connection is handled as the sidecar does: (part of)
    the ClientHello read into the Stream's buffer, then `terminate`, then an HTTP-ish echo."""

    def __init__(self, ctx: ssl.SSLContext, prefetch: str = "hello", drop_early: bool = False, timeout: float = TIMEOUT):
        self.ctx, self.prefetch, self.drop_early, self.timeout = ctx, prefetch, drop_early, timeout
        self.result: asyncio.Future | None = None
        self.hello = b""
        self.port = 0

    async def start(self) -> "Terminator":
        self.result = asyncio.get_running_loop().create_future()
        self.srv = await asyncio.start_server(self._conn, "127.0.0.1", 0, limit=netio.STREAM_LIMIT)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def _conn(self, r, w) -> None:
        s = netio.Stream(r, w)
        try:
            if self.prefetch == "hello":
                self.hello = await read_hello(s)
            elif self.prefetch == "some":
                s.buf += await asyncio.wait_for(s.r.readexactly(5), TIMEOUT)  # only the record header
            if self.drop_early:
                s.buf.clear()
                netio.take_buffered(s)
            plain = await tlsterm.terminate(s, self.ctx, self.timeout)
        except Exception as exc:  # handed to the test
            self.result.set_result(exc)
            w.close()
            return
        try:
            head = await asyncio.wait_for(plain.read_head(1 << 16), TIMEOUT)
            plain.w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))
            await plain.w.drain()
            self.result.set_result(("ok", head, plain.w.get_extra_info("ssl_object").selected_alpn_protocol()))
        except Exception as exc:  # handed to the test
            self.result.set_result(exc)
        finally:
            plain.close()

    def close(self) -> None:
        self.srv.close()


def leaf_ctx(ca) -> ssl.SSLContext:
    ctx = server_ctx(ca, NAME)
    ctx.set_alpn_protocols(tlsterm.ALPN)
    return ctx


# ----------------------------------------------------------------------------------- terminate


@pytest.mark.parametrize("prefetch", ["hello", "some", "none"])
def test_terminate_replays_the_hello_and_carries_http_both_ways(ca, prefetch):
    async def main():
        t = await Terminator(leaf_ctx(ca), prefetch=prefetch).start()
        ctx = client_ctx(ca)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", t.port, ssl=ctx, server_hostname=NAME), TIMEOUT)
        req = b"GET /x HTTP/1.1\r\nHost: inspected.test\r\n\r\n"
        w.write(req)
        await w.drain()
        resp = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
        body = await asyncio.wait_for(r.readexactly(len(req)), TIMEOUT)
        alpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
        res = await asyncio.wait_for(t.result, TIMEOUT)
        w.close()
        t.close()
        return resp, body, alpn, res, t.hello, req

    resp, body, alpn, res, hello, req = run(main())
    assert resp.startswith(b"HTTP/1.1 200 OK") and body == req
    assert res == ("ok", req, "http/1.1")
    assert alpn == "http/1.1"  # h2 offered, not chosen: the agent's leg is HTTP/1.1 only
    if prefetch == "hello":
        assert hello[:1] == b"\x16" and tlshello.parse_client_hello(hello).sni == NAME


def test_terminate_needs_the_bytes_already_read():
    # control for the replay: the same server dropping the ClientHello it read never completes
    async def main():
        t = await Terminator(leaf_ctx(ca_), prefetch="hello", drop_early=True, timeout=0.5).start()
        # a real client: its hello is read, then dropped by this server
        client = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", t.port, ssl=client_ctx(ca_), server_hostname=NAME))
        res = await asyncio.wait_for(t.result, TIMEOUT)
        client.cancel()
        try:
            await client
        except (asyncio.CancelledError, OSError, ssl.SSLError):
            pass
        t.close()
        return res

    ca_ = trustme.CA()
    res = run(main())
    assert isinstance(res, TlsFailed) and res.reason == "agent_tls_failed"


def test_terminate_fails_when_the_agent_does_not_trust_the_ca(ca, other_ca):
    async def main(trusting):
        t = await Terminator(leaf_ctx(ca)).start()
        client_err = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", t.port, ssl=client_ctx(trusting), server_hostname=NAME), TIMEOUT)
            w.write(b"GET / HTTP/1.1\r\nHost: inspected.test\r\n\r\n")
            await w.drain()
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
            w.close()
        except ssl.SSLCertVerificationError as exc:
            client_err = exc
        res = await asyncio.wait_for(t.result, TIMEOUT)
        t.close()
        return client_err, res

    client_err, res = run(main(other_ca))
    assert client_err is not None
    assert isinstance(res, TlsFailed) and res.reason == "agent_tls_failed" and res.detail
    assert str(res).startswith("agent_tls_failed: ")
    # control: the same server with a client that trusts the CA
    client_err, res = run(main(ca))
    assert client_err is None and res[0] == "ok"


def test_terminate_fails_when_the_agent_closes_mid_handshake(ca):
    async def main():
        t = await Terminator(leaf_ctx(ca), prefetch="none").start()
        r, w = await asyncio.open_connection("127.0.0.1", t.port)
        w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then nothing
        await w.drain()
        w.close()
        res = await asyncio.wait_for(t.result, TIMEOUT)
        t.close()
        return res

    res = run(main())
    assert isinstance(res, TlsFailed) and res.reason == "agent_tls_failed"


# ---------------------------------------------------------------------------------------- dial


async def tls_echo_server(ctx: ssl.SSLContext):
    async def on(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(on, "127.0.0.1", 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def dial_to(ctx_server: ssl.SSLContext, server_hostname: str, cafile: str | None):
    async def main():
        srv, port = await tls_echo_server(ctx_server)
        try:
            up = await tlsterm.dial(("127.0.0.1",), port, server_hostname, tlsterm.upstream_context(cafile=cafile), TIMEOUT)
        except Exception as exc:  # handed to the test
            srv.close()
            return exc
        up.w.write(b"ping")
        await up.w.drain()
        echo = await asyncio.wait_for(up.r.readexactly(4), TIMEOUT)
        version = up.w.get_extra_info("ssl_object").version()
        up.close()
        srv.close()
        return echo, version

    return run(main())


def test_dial_verifies_and_connects(ca, ca_file):
    echo, version = dial_to(server_ctx(ca, "upstream.test"), "upstream.test", ca_file)
    assert echo == b"ping" and version in ("TLSv1.2", "TLSv1.3")


def test_dial_wrong_name(ca, ca_file):
    exc = dial_to(server_ctx(ca, "upstream.test"), "other.test", ca_file)
    assert isinstance(exc, TlsFailed) and exc.reason == "upstream_certificate_invalid"
    assert "Hostname mismatch" in exc.detail and "other.test" in exc.detail


def test_dial_expired_certificate(ca, ca_file):
    now = datetime.datetime.now(datetime.timezone.utc)
    ctx = server_ctx(ca, "upstream.test", not_before=now - datetime.timedelta(days=10), not_after=now - datetime.timedelta(days=1))
    exc = dial_to(ctx, "upstream.test", ca_file)
    assert isinstance(exc, TlsFailed) and exc.reason == "upstream_certificate_invalid"
    assert "certificate has expired" in exc.detail


def test_dial_unknown_ca(other_ca, ca_file):
    exc = dial_to(server_ctx(other_ca, "upstream.test"), "upstream.test", ca_file)
    assert isinstance(exc, TlsFailed) and exc.reason == "upstream_certificate_invalid"
    assert "unable to get local issuer certificate" in exc.detail


def test_dial_default_trust_does_not_know_a_private_ca(ca, monkeypatch, tmp_path):
    # cafile=None: OpenSSL's defaults; point them at an empty directory so the host store is not consulted
    empty = tmp_path / "empty"
    empty.mkdir()
    other = trustme.CA()
    bundle = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    exc = dial_to(server_ctx(ca, "upstream.test"), "upstream.test", None)
    assert isinstance(exc, TlsFailed) and exc.reason == "upstream_certificate_invalid"
    # control: SSL_CERT_FILE naming the right CA is what OpenSSL's defaults read
    good = tmp_path / "good.pem"
    ca.cert_pem.write_to_path(str(good))
    monkeypatch.setenv("SSL_CERT_FILE", str(good))
    echo, _ = dial_to(server_ctx(ca, "upstream.test"), "upstream.test", None)
    assert echo == b"ping"


def test_dial_never_falls_back_to_plaintext(ca_file):
    async def main():
        async def on(r, w):
            await r.read(65536)
            w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await w.drain()
            w.close()

        srv = await asyncio.start_server(on, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            await tlsterm.dial(("127.0.0.1",), port, "upstream.test", tlsterm.upstream_context(cafile=ca_file), TIMEOUT)
        except Exception as exc:  # handed to the test
            return exc
        finally:
            srv.close()
        return None

    exc = run(main())
    assert isinstance(exc, TlsFailed) and exc.reason == "upstream_tls_failed"


def blocking_tls_server(ctx: ssl.SSLContext) -> tuple[socket.socket, threading.Thread]:
    """One handshake served by OpenSSL on a plain blocking socket (it sends its alert before
    closing, which asyncio's server side may not)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def serve():
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(4))
            except (OSError, ssl.SSLError):
                pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return lsock, th


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("old", [True, False])
def test_dial_refuses_tls_below_1_2(ca, ca_file, old):
    ctx = server_ctx(ca, "upstream.test")
    if old:
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            pytest.skip("this OpenSSL cannot serve TLS 1.1")
    lsock, th = blocking_tls_server(ctx)

    async def main():
        try:
            up = await tlsterm.dial(("127.0.0.1",), lsock.getsockname()[1], "upstream.test",
                                    tlsterm.upstream_context(cafile=ca_file), TIMEOUT)
        except Exception as exc:  # handed to the test
            return exc
        up.w.write(b"ping")
        echo = await asyncio.wait_for(up.r.readexactly(4), TIMEOUT)
        up.close()
        return echo

    try:
        res = run(main())
    finally:
        lsock.close()
        th.join(TIMEOUT)
    if old:
        assert isinstance(res, TlsFailed) and res.reason == "upstream_tls_failed", repr(res)
    else:
        assert res == b"ping"  # control: the same server allowed TLS 1.2+


def test_dial_oserror_when_nothing_listens(ca_file):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = sock.getsockname()[1]
    try:
        async def main():
            return await tlsterm.dial(("127.0.0.1",), port, "upstream.test", tlsterm.upstream_context(cafile=ca_file), TIMEOUT)

        with pytest.raises(OSError) as info:
            run(main())
        assert not isinstance(info.value, TlsFailed)
        assert f"upstream.test:{port}" in str(info.value)
        with pytest.raises(OSError):
            run(tlsterm.dial((), port, "upstream.test", tlsterm.upstream_context(cafile=ca_file), TIMEOUT))
    finally:
        sock.close()


def test_dial_offers_only_http_1_1(ca, ca_file):
    """What the upstream saw in the ClientHello: ALPN http/1.1 alone. The server here is a
    Terminator (reads the hello, then completes the handshake)."""

    async def main(ctx_client):
        leaf = server_ctx(ca, "upstream.test")
        leaf.set_alpn_protocols(["h2", "http/1.1"])
        t = await Terminator(leaf).start()
        if ctx_client is None:
            up = await tlsterm.dial(("127.0.0.1",), t.port, "upstream.test", tlsterm.upstream_context(cafile=ca_file), TIMEOUT)
            w = up.w
        else:
            _, w = await asyncio.open_connection("127.0.0.1", t.port, ssl=ctx_client, server_hostname="upstream.test")
        selected = w.get_extra_info("ssl_object").selected_alpn_protocol()
        w.write(b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        await w.drain()
        await asyncio.wait_for(t.result, TIMEOUT)
        w.close()
        t.close()
        return offered_alpn(t.hello), selected

    offered, selected = run(main(None))
    assert offered == [b"http/1.1"] and selected == "http/1.1"
    # control: a client offering h2 is seen offering it (and gets it from this server)
    ctx = client_ctx(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    offered, selected = run(main(ctx))
    assert offered == [b"h2", b"http/1.1"] and selected == "h2"


def test_upstream_context_verifies():
    ctx = tlsterm.upstream_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2

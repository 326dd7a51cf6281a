"""CONNECT: SNI must match the CONNECT host (trustme TLS server on loopback), large transfers
intact, many concurrent connections (DESIGN §9; ATTACKS C.2 17, 22-23)."""

import asyncio
import hashlib
import os
import ssl

import pytest

from firma.core.auditcaps import suppressed_count
from firma.core.record import replace
import trustme

from upstreams import ATTR, HttpUpstream, RawUpstream, Stack, fake_resolver, run


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_server_ctx(ca, *names):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


async def open_tunnel(port: int, target: str, extra: str = ""):
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode())
    await w.drain()
    line = await r.readuntil(b"\r\n\r\n")
    return r, w, line


async def tls_over(r, w, ca, server_hostname):
    """Start TLS on an open tunnel (asyncio start_tls on the client stream)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    loop = asyncio.get_running_loop()
    transport = w.transport
    protocol = transport.get_protocol()
    new = await asyncio.wait_for(loop.start_tls(transport, protocol, ctx, server_hostname=server_hostname), 5)
    w._transport = new  # StreamWriter follows the upgraded transport
    return r, w


def test_sni_matching_host_passes_and_mismatch_never_reaches_upstream(tmp_path, ca):
    async def main():
        srv = await RawUpstream(ssl_ctx=tls_server_ctx(ca, "allowed.test", "evil.test"), echo=True).start()
        res = fake_resolver({"allowed.test": ["127.0.0.1"]})
        async with Stack(tmp_path, allow=[f"allowed.test:{srv.port}", "allowed.test:443"], resolver=res) as s:
            # matching SNI: the handshake completes end to end and data echoes back
            r, w, line = await open_tunnel(s.bridge_port, f"allowed.test:{srv.port}")
            assert line.startswith(b"HTTP/1.1 200")
            r, w = await tls_over(r, w, ca, "allowed.test")
            w.write(b"ping")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            w.close()
            await asyncio.sleep(0.1)
            before = srv.connections
            # domain fronting: CONNECT allowed.test, ClientHello SNI evil.test → closed, no dial
            r, w, line = await open_tunnel(s.bridge_port, f"allowed.test:{srv.port}")
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)):
                await tls_over(r, w, ca, "evil.test")
            w.close()
            # plain HTTP inside a hostname CONNECT to 443 is refused too (tls_required)
            r, w, line = await open_tunnel(s.bridge_port, "allowed.test:443")
            w.write(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await asyncio.sleep(0.2)
            after = srv.connections
        await srv.aclose()
        return before, after, s

    before, after, s = run(main())
    assert before == 1 and after == 1  # the mismatch and the non-TLS attempts dialed nothing
    evs = s.events()
    reasons = [e["deny_reason"] for e in evs if e["decision"] == 2]
    assert sorted(reasons) == ["sni_mismatch", "tls_required"]
    assert {e["sandbox_id"] for e in evs} == {ATTR["x-firma-sandbox-id"]}


FRONTING = {
    "at once": [b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"],
    "in pieces": [b"GET / HT", b"TP/1.1\r\nHost: evil.test\r\n\r\n"],
    "after a pause": [0.5, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"],
    "after two silent seconds": [2.0, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"],
    "two spaces": [b"GET  / HTTP/1.1\r\nHost: evil.test\r\n\r\n"],
    "trailing space": [b"GET / HTTP/1.1 \r\nHost: evil.test\r\n\r\n"],
    "HTTP/1.10": [b"GET / HTTP/1.10\r\nHost: evil.test\r\n\r\n"],
    "a client-first banner": [b"SSH-2.0-firma_probe\r\n"],
}


async def _tunnel(port: int, target: str, steps, read_timeout: float = 12) -> bytes:
    r, w, line = await open_tunnel(port, target)
    assert line.startswith(b"HTTP/1.1 200")
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
            continue
        w.write(step)
        await w.drain()
        await asyncio.sleep(0.05)
    try:
        return await asyncio.wait_for(r.read(4096), read_timeout)
    finally:
        w.close()


def test_a_hostname_tunnel_carries_tls_with_its_sni_or_nothing(tmp_path):
    """Domain fronting through a tunnel (ATTACKS #3/#16; issue "what the policy says"): CONNECT
    allowed.test:P, then anything but a TLS ClientHello naming allowed.test — a plain request for
    another Host, however it is spelled or timed, a banner — is refused (`tls_required`) and dials
    nothing: no timing window or parser leniency decides. Controls: a ClientHello with the allowed
    SNI reaches the upstream; a tunnel to an allowed IP literal may carry HTTP (the rule names the
    address itself)."""
    from test_tls_hello_and_framing import client_hello

    async def main():
        srv = await RawUpstream(echo=True).start()
        res = fake_resolver({"allowed.test": ["127.0.0.1"]})
        host = f"allowed.test:{srv.port}"
        async with Stack(tmp_path, allow=[host, f"127.0.0.1:{srv.port}"], resolver=res) as s:
            refused = {name: await _tunnel(s.bridge_port, host, steps) for name, steps in FRONTING.items()}
            assert srv.connections == 0, refused  # nothing was dialed
            hello = client_hello("allowed.test")
            tls = await _tunnel(s.bridge_port, host, [hello], read_timeout=5)
            ip = await _tunnel(s.bridge_port, f"127.0.0.1:{srv.port}", FRONTING["at once"], read_timeout=5)
            await asyncio.sleep(0.2)
            dialed = srv.connections
        await srv.aclose()
        return refused, tls, hello, ip, dialed, host, s

    refused, tls, hello, ip, dialed, host, s = run(main())
    assert refused == dict.fromkeys(FRONTING, b"")
    assert tls == hello and ip == FRONTING["at once"][0] and dialed == 2  # the controls
    denied = [(e["resource"], e["deny_reason"]) for e in s.events() if e["decision"] == 2]
    assert denied == [(host, "tls_required")] * len(FRONTING)


def test_a_declared_opaque_destination_carries_any_protocol_labelled_in_the_audit(tmp_path):
    """`allow_tcp = ["db.test:P"]`: a server-speaks-first protocol through a hostname tunnel, no
    peeking; the audit labels the tunnel `opaque_tcp`. Control: the same destination merely
    allowed (allow_hosts) refuses the same exchange."""

    async def exchange(allow_tcp):
        srv = await RawUpstream(reply=b"220 db.test ready\r\n").start()
        res = fake_resolver({"db.test": ["127.0.0.1"]})
        host = f"db.test:{srv.port}"
        from firma.services.sidecar import SidecarLimits

        stack = Stack(tmp_path / ("opaque" if allow_tcp else "plain"), allow=[] if allow_tcp else [host], resolver=res,
                      limits=SidecarLimits(setup_timeout=2.0))  # the control's wait for a ClientHello
        stack.config = replace(stack.config, allow_tcp=(host,) if allow_tcp else ())
        async with stack as s:
            got = await _tunnel(s.bridge_port, host, [], read_timeout=15)
        await srv.aclose()
        return got, host, s

    (tmp_path / "opaque").mkdir()
    (tmp_path / "plain").mkdir()
    got, host, s = run(exchange(True))
    assert got == b"220 db.test ready\r\n"
    tunnels = [e for e in s.events() if e["action"] == "network.connect"]
    assert [(e["decision"], e["deny_reason"]) for e in tunnels] == [(1, "opaque_tcp")]
    got, host, s = run(exchange(False))  # control
    assert got == b""
    assert [(e["decision"], e["deny_reason"]) for e in s.events()] == [(2, "tls_required")]


def test_tunnel_64mib_upload_byte_identical(tmp_path):
    payload = os.urandom(64 * 1024 * 1024)
    want = hashlib.sha256(payload).hexdigest().encode()

    async def main():
        srv = await RawUpstream().start()  # replies with sha256 of all it received after EOF
        async with Stack(tmp_path, allow=[f"127.0.0.1:{srv.port}"]) as s:
            r, w, line = await open_tunnel(s.bridge_port, f"127.0.0.1:{srv.port}")
            assert line.startswith(b"HTTP/1.1 200")
            mv = memoryview(payload)
            for i in range(0, len(mv), 1 << 20):
                w.write(mv[i : i + (1 << 20)])
                await w.drain()
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 60)
            w.close()
        await srv.aclose()
        return got, srv, s

    got, srv, s = run(main())
    assert got == want and len(srv.received) == len(payload)
    assert hashlib.sha256(srv.received).hexdigest().encode() == want
    (ev,) = s.events()
    assert ev["action"] == "network.connect" and ev["decision"] == 1 and ev["response_size"] == 64


def test_500_concurrent_connections_none_lost(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"y" * 1000).start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:

            async def one(i):
                r, w = await asyncio.open_connection("127.0.0.1", s.bridge_port)
                w.write(f"GET http://127.0.0.1:{up.port}/{i} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
                await w.drain()
                data = await asyncio.wait_for(r.read(), 60)
                w.close()
                return data

            outs = await asyncio.gather(*(one(i) for i in range(500)))
        await up.aclose()
        return outs, up, s

    outs, up, s = run(main())
    assert all(o.startswith(b"HTTP/1.1 200") and o.endswith(b"y" * 1000) for o in outs)
    assert sorted(h.target for h, _ in up.rec.requests) == sorted(f"/{i}" for i in range(500))
    evs = s.events()
    # Beyond 200 events per second and sandbox the audit counts instead of writing (DESIGN §9
    # "Caps"): every exchange is either its own line or counted in a suppression record.
    counted = sum(map(suppressed_count, evs))
    assert len([e for e in evs if not suppressed_count(e)]) + counted == 500 and {e["decision"] for e in evs} == {1}


def test_connect_denials(tmp_path):
    async def main():
        async with Stack(tmp_path, allow=["allowed.test"], resolver=fake_resolver({"allowed.test": ["93.184.216.34"]})) as s:
            out = []
            for target in ("evil.test:443", "allowed.test:22", "allowed.test", "127.0.0.1:22", "[::1]:443", "allowed.test@evil.test:443"):
                r, w, line = await open_tunnel(s.bridge_port, target)
                out.append(line)
                w.close()
            return out, s

    out, s = run(main())
    for line in out:
        assert line.startswith(b"HTTP/1.1 4"), line
    assert [e["decision"] for e in s.events()] == [2] * 6


def test_idle_tunnel_and_silent_tls_client_are_cut(tmp_path):
    from firma.services.sidecar import SidecarLimits

    limits = SidecarLimits(idle_timeout=0.6, setup_timeout=0.5)

    async def main():
        srv = await RawUpstream(echo=True).start()
        res = fake_resolver({"quiet.test": ["127.0.0.1"]})
        async with Stack(tmp_path, allow=[f"127.0.0.1:{srv.port}", "quiet.test:443"], limits=limits, resolver=res, bridge=False) as s:
            r, w, line = await open_tunnel(s.sidecar_port, f"127.0.0.1:{srv.port}")
            w.write(b"x")
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
            assert await asyncio.wait_for(r.read(), 10) == b""  # idle: closed by the sidecar
            w.close()
            # CONNECT to a hostname on 443 that never sends a ClientHello: cut at setup time, no dial
            conns = srv.connections
            r, w, line = await open_tunnel(s.sidecar_port, "quiet.test:443")
            assert line.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            await asyncio.sleep(0.1)
        await srv.aclose()
        return s, conns, srv.connections

    s, before, after = run(main())
    assert before == after == 1
    reasons = sorted(e["deny_reason"] for e in s.events())
    assert reasons == ["idle_timeout", "tls_required"]


def test_long_stream_relayed_intact_and_tunnel_lifetime_enforced(tmp_path):
    """ATTACKS #22: a server-sent-events style response (2.5 MiB in 40 chunks, written over
    time) reaches the client through the proxy byte for byte; a tunnel that outlives
    max_tunnel_secs is cut and its event says `lifetime_exceeded` (the same tunnel's echo worked
    before the cut: the control)."""
    from firma.services.sidecar import SidecarLimits

    events = [os.urandom(64 * 1024) for _ in range(40)]
    want = hashlib.sha256(b"".join(events)).hexdigest()

    async def sse(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for e in events:
            w.write(b"%x\r\n" % len(e) + e + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.005)
        w.write(b"0\r\n\r\n")
        await w.drain()
        w.close()

    async def main():
        server = await asyncio.start_server(sse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        echo = await RawUpstream(echo=True).start()
        limits = SidecarLimits(max_tunnel_secs=0.6)
        async with Stack(tmp_path, allow=[f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"], limits=limits) as s:
            r, w = await asyncio.open_connection("127.0.0.1", s.bridge_port, limit=1 << 22)
            w.write(f"GET http://127.0.0.1:{port}/stream HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            body = bytearray()
            while True:
                size = int((await asyncio.wait_for(r.readuntil(b"\r\n"), 10)).strip(), 16)
                if size == 0:
                    break
                body += await asyncio.wait_for(r.readexactly(size), 10)
                await r.readexactly(2)
            w.close()
            r2, w2, line = await open_tunnel(s.bridge_port, f"127.0.0.1:{echo.port}")
            assert line.startswith(b"HTTP/1.1 200")
            w2.write(b"ping")
            await w2.drain()
            echoed = await asyncio.wait_for(r2.readexactly(4), 5)
            t0 = asyncio.get_running_loop().time()
            cut = False
            while asyncio.get_running_loop().time() - t0 < 10:
                try:
                    w2.write(b"x")
                    await w2.drain()
                    if await asyncio.wait_for(r2.read(1), 0.2) == b"":
                        cut = True
                        break
                except asyncio.TimeoutError:
                    pass
                except (ConnectionError, OSError):
                    cut = True
                    break
            w2.close()
            await asyncio.sleep(0.2)
        server.close()
        await echo.aclose()
        return head, hashlib.sha256(body).hexdigest(), echoed, cut, echo.port, s

    head, got, echoed, cut, echo_port, s = run(main())
    assert head.startswith(b"HTTP/1.1 200") and got == want
    assert echoed == b"ping" and cut
    tunnels = [e for e in s.events() if e["resource"] == f"127.0.0.1:{echo_port}"]
    assert [e["deny_reason"] for e in tunnels] == ["lifetime_exceeded"]

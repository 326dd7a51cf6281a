"""ClientHello peeking with real handshakes, response framing through the sidecar, bridge
failure modes and shutdown auditing (DESIGN §9; ATTACKS C.2 17, C.7 49, C.8 56)."""

import asyncio
import ssl

import pytest

from firma.core import auditfmt, tlshello
from firma.services.audit_writer import AuditWriter, load_or_create_key
from firma.services.bridge import Bridge

from upstreams import ATTR, HttpUpstream, RawUpstream, Stack, audit_events, fake_resolver, run, send_raw, split_responses


def client_hello(server_hostname):
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_hostname is not None
    if server_hostname is None:
        ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_real_client_hellos():
    hello = client_hello("api.example.com")
    assert tlshello.parse_client_hello(hello) == tlshello.Hello("api.example.com", False)
    assert tlshello.parse_client_hello(client_hello(None)).sni is None
    for cut in (0, 1, 4, 5, 40, len(hello) - 1):
        with pytest.raises(tlshello.NeedMore):
            tlshello.parse_client_hello(hello[:cut])
    with pytest.raises(tlshello.NotTls):
        tlshello.parse_client_hello(b"GET / HTTP/1.1\r\n")
    with pytest.raises(tlshello.BadHello):
        tlshello.parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # ServerHello type


def with_ech(hello: bytes) -> bytes:
    """The ClientHello record with an ECH extension (0xfe0d) appended, lengths fixed."""
    hs = bytearray(hello[5:])
    ext = b"\xfe\x0d\x00\x01\x00"
    p = 4 + 2 + 32
    p += 1 + hs[p]
    p += 2 + int.from_bytes(hs[p : p + 2], "big")
    p += 1 + hs[p]
    ext_len = int.from_bytes(hs[p : p + 2], "big") + len(ext)
    hs[p : p + 2] = ext_len.to_bytes(2, "big")
    hs += ext
    hs[1:4] = (len(hs) - 4).to_bytes(3, "big")
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + bytes(hs)


def test_client_hello_split_over_records_and_ech_flag():
    hello = client_hello("split.example.com")
    body = hello[5:]
    recs = b"".join(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:50], body[50:]))
    assert tlshello.parse_client_hello(recs).sni == "split.example.com"
    h = tlshello.parse_client_hello(with_ech(hello))
    assert h.ech and h.sni == "split.example.com"


def test_ech_and_missing_sni_tunnels_are_refused_before_any_dial(tmp_path):
    """ATTACKS #17 at the sidecar: a tunnel to a hostname whose ClientHello carries ECH, or no
    SNI, is refused (ech_not_allowed, sni_missing) and never dialed. Controls through the same
    sidecar: the matching-SNI ClientHello to that name, and a no-SNI one to an allowed IP
    literal, are relayed (the raw upstream echoes them)."""

    async def tunnel(port: int, target: str, data: bytes, *, relayed: bool) -> bool:
        """Send data into a tunnel; True when it comes back echoed (relayed) or the tunnel
        closes without a byte (refused), whichever was expected."""
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + data)
        await w.drain()
        try:
            assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            if relayed:
                return await asyncio.wait_for(r.readexactly(len(data)), 5) == data
            return await asyncio.wait_for(r.read(), 5) == b""
        finally:
            w.close()

    async def main():
        srv = await RawUpstream(echo=True).start()
        res = fake_resolver({"allowed.test": ["127.0.0.1"]})
        name, literal = f"allowed.test:{srv.port}", f"127.0.0.1:{srv.port}"
        good = client_hello("allowed.test")
        async with Stack(tmp_path, allow=[name, literal], resolver=res) as s:
            assert await tunnel(s.bridge_port, name, with_ech(good), relayed=False)
            assert await tunnel(s.bridge_port, name, client_hello(None), relayed=False)
            assert srv.connections == 0  # neither dialed
            assert await tunnel(s.bridge_port, name, good, relayed=True)
            assert await tunnel(s.bridge_port, literal, client_hello(None), relayed=True)
            await asyncio.sleep(0.2)
            dialed = srv.connections
        await srv.aclose()
        return dialed, name, s

    dialed, name, s = run(main())
    assert dialed == 2
    denied = [(e["resource"], e["deny_reason"]) for e in s.events() if e["decision"] == 2]
    assert denied == [(name, "ech_not_allowed"), (name, "sni_missing")]


@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_response_framings_relayed_exactly(tmp_path, mode):
    async def main():
        up = await HttpUpstream(body=b"framed-body", chunked_response=mode == "chunked", close_delimited=mode == "close").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            close = "Connection: close\r\n" if mode == "chunked" else ""  # close-delimited: the proxy must close
            r = await send_raw(s.bridge_port, f"GET http://127.0.0.1:{up.port}/ HTTP/1.1\r\n{close}\r\n".encode())
        await up.aclose()
        return r, s

    r, s = run(main())
    if mode == "chunked":
        assert r.endswith(b"\r\nb\r\nframed-body\r\n0\r\n\r\n") and b"Transfer-Encoding: chunked" in r
    else:
        assert r.endswith(b"\r\n\r\nframed-body") and b"Connection: close" in r
    (ev,) = s.events()
    assert ev["decision"] == 1 and ev["response_size"] == 11 and ev["dispatch_status"] == 200


def test_upstream_with_cl_and_te_gets_one_framing_downstream(tmp_path):
    async def main():
        body = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        raw = await RawUpstream(reply=body).start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{raw.port}"]) as s:
            r = await send_raw(s.bridge_port, f"GET http://127.0.0.1:{raw.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode(), timeout=5)
        await raw.aclose()
        return r

    r = run(main())
    assert b"Content-Length" not in r and r.endswith(b"5\r\nhello\r\n0\r\n\r\n")


def test_bridge_with_sidecar_gone_fails_closed(tmp_path):
    """ATTACKS C.7 49: no sidecar → the agent gets an error, nothing is dialed directly."""

    async def main():
        up = await HttpUpstream().start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            pass  # sidecar and bridge stopped; start a bridge pointing at the dead endpoint
        audit = AuditWriter(str(tmp_path / "bridge.jsonl"), load_or_create_key(str(tmp_path / "b.key")))
        b = Bridge(sidecar_endpoint=s.endpoint, attribution=ATTR, audit=audit)
        port = await b.serve_address()
        r = await send_raw(port, f"GET http://127.0.0.1:{up.port}/ HTTP/1.1\r\n\r\n".encode())
        r2 = await send_raw(port, b"GET http://x/ HTTP/1.1\r\nBad Header: v\r\n\r\n")
        await b.aclose()
        await audit.aclose()
        await up.aclose()
        return r, r2, up

    r, r2, up = run(main())
    assert r.startswith(b"HTTP/1.1 502") and b"sidecar_unreachable" in r
    assert r2.startswith(b"HTTP/1.1 400")
    assert up.rec.connections == 0
    evs = audit_events(tmp_path / "bridge.jsonl")
    assert [e["deny_reason"] for e in evs] == ["sidecar_unreachable", "malformed_request"]
    assert {e["sandbox_id"] for e in evs} == {ATTR["x-firma-sandbox-id"]}


def test_shutdown_flushes_in_flight_tunnel_event(tmp_path):
    async def main():
        srv = await RawUpstream(echo=True).start()
        s = Stack(tmp_path, allow=[f"127.0.0.1:{srv.port}"], bridge=False)
        await s.__aenter__()
        r, w = await asyncio.open_connection("127.0.0.1", s.sidecar_port)
        w.write(f"CONNECT 127.0.0.1:{srv.port} HTTP/1.1\r\n\r\nabc".encode())
        await r.readuntil(b"\r\n\r\n")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"abc"
        await s.__aexit__(None, None, None)  # sidecar stops while the tunnel is open
        w.close()
        await srv.aclose()
        return s

    s = run(main())
    (ev,) = s.events()
    assert ev["action"] == "network.connect" and ev["decision"] == 1 and ev["deny_reason"] == "shutdown" and ev["response_size"] == 3


def test_control_characters_cannot_shift_signed_fields(tmp_path):
    key = auditfmt.generate_key()
    ev = auditfmt.make_event(resource="a\n2\nforged", action="dns.query")
    line = auditfmt.signed_line(ev, key)
    assert auditfmt.verify_line(line, key.public_key())[0]
    assert "\\n" not in ev["resource"] and "\n" not in ev["resource"]


def test_large_length_framed_download_is_exact_and_slow_upstream_not_cut(tmp_path):
    """A 24 MiB Content-Length body arrives byte-identical through bridge and sidecar; a body
    trickling for longer than the idle limit in total (but never idle that long) is not cut."""
    import hashlib
    import os as _os

    from firma.services.sidecar import SidecarLimits

    payload = _os.urandom(24 * 1024 * 1024)

    async def trickle(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for i in range(10):
            w.write(b"%d" % i)
            await w.drain()
            await asyncio.sleep(0.15)
        w.close()

    async def main():
        up = await HttpUpstream(body=payload).start()
        slow = await asyncio.start_server(trickle, "127.0.0.1", 0)
        sport = slow.sockets[0].getsockname()[1]
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}", f"127.0.0.1:{sport}"], limits=SidecarLimits(idle_timeout=0.6)) as s:
            r = await send_raw(s.bridge_port, f"GET http://127.0.0.1:{up.port}/big HTTP/1.1\r\nConnection: close\r\n\r\n".encode(), timeout=30)
            r2 = await send_raw(s.bridge_port, f"GET http://127.0.0.1:{sport}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode(), timeout=30)
        slow.close()
        await up.aclose()
        return r, r2, s

    r, r2, s = run(main())
    (h, body), = split_responses(r)
    assert h.status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
    assert r2.endswith(b"\r\n\r\n0123456789")
    assert [e["response_size"] for e in s.events()] == [len(payload), 10]

"""DNS refusal stub: pure reply construction (property-tested) and real UDP/TCP sockets."""

import asyncio
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from firma.core import dnsmsg
from firma.services.dns_stub import MAX_TCP_FRAME, DnsStub

from upstreams import run


def query(name: str, qtype: int = 1, ident: int = 0x1234, flags: int = 0x0100, qdcount: int = 1, extra: bytes = b"") -> bytes:
    q = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\0"
    return struct.pack("!HHHHHH", ident, flags, qdcount, 0, 0, 1 if extra else 0) + q + struct.pack("!HH", qtype, 1) + extra


def parse_reply(r: bytes):
    """Independent parse of a reply: header fields and the raw question bytes."""
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", r)
    return ident, flags, qd, an, ns, ar, r[12:]


OPT = b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00"  # EDNS OPT record


def test_refusal_copies_id_question_and_drops_opt():
    q = query("secret.example.com", 16, ident=0xBEEF, extra=OPT)
    r = dnsmsg.refusal(q)
    ident, flags, qd, an, ns, ar, rest = parse_reply(r)
    assert ident == 0xBEEF
    assert flags & 0x8000 and flags & 0x000F == 5 and flags & 0x0100  # QR, REFUSED, RD kept
    assert (qd, an, ns, ar) == (1, 0, 0, 0)
    assert rest == q[12 : len(q) - len(OPT)]  # the question only, OPT dropped


def test_short_message_gets_no_reply_and_garbage_gets_header_only():
    assert dnsmsg.refusal(b"\x01" * 11) is None
    r = dnsmsg.refusal(b"\xab\xcd" + b"\x00\x00" + b"\x00\x01" + b"\x00" * 6 + b"\xc0\x0c")  # pointer name
    assert len(r) == 12 and r[:2] == b"\xab\xcd" and struct.unpack_from("!H", r, 4)[0] == 0


def test_odd_shapes_ptr_txt_any_multi_question_opcode():
    for q in (query("4.3.2.1.in-addr.arpa", 12), query("x.test", 16), query("x.test", 255),
              query("a.test", 1, qdcount=2) + query("b.test")[12:], query("x.test", 1, flags=0x2900)):
        r = dnsmsg.refusal(q)
        assert r[:2] == q[:2] and r[3] & 0x0F == 5
        assert (r[2] & 0x78) == (q[2] & 0x78)  # opcode kept
    assert dnsmsg.parse_question(query("a.test", 1, qdcount=2) + query("b.test")[12:]).qname == "a.test"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_property_any_bytes_never_crash_and_reply_is_refused(data):
    r = dnsmsg.refusal(data)
    if len(data) < 12:
        assert r is None
        return
    ident, flags, qd, an, ns, ar, rest = parse_reply(r)
    assert ident == struct.unpack_from("!H", data)[0]
    assert flags & 0x000F == 5 and flags & 0x8000
    assert (an, ns, ar) == (0, 0, 0)
    q = dnsmsg.parse_question(data)
    if q is None:
        assert qd == 0 and rest == b""
    else:
        assert qd == 1 and rest == q.raw and data[12 : 12 + len(rest)] == rest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=5), st.integers(0, 65535), st.integers(0, 65535))
def test_property_well_formed_queries_echo_the_question(labels, qtype, ident):
    q = query(".".join(labels), qtype, ident=ident)
    r = dnsmsg.refusal(q)
    assert r[:2] == q[:2] and r[12:] == q[12:] and r[3] & 0x0F == 5
    assert dnsmsg.parse_question(q).qname == ".".join(labels)


def test_tcp_frames_split_and_oversize():
    buf = bytearray(dnsmsg.frame(b"a" * 20) + dnsmsg.frame(b"b" * 13) + b"\x00")
    msgs, over = dnsmsg.tcp_frames(buf, 100)
    assert msgs == [b"a" * 20, b"b" * 13] and not over and buf == b"\x00"
    assert dnsmsg.tcp_frames(bytearray(b"\xff\xff"), 100)[1]


async def _udp_ask(port: int, msg: bytes, timeout=2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_sendto(s, msg, ("127.0.0.1", port))
        return await asyncio.wait_for(loop.sock_recv(s, 4096), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        s.close()


def test_stub_serves_udp_and_tcp_on_one_port_and_reports_queries():
    seen = []

    async def main():
        stub = DnsStub(on_query=lambda n, t, answered: seen.append((n, t)))
        port = await stub.serve_address("127.0.0.1", 0)
        try:
            r = await _udp_ask(port, query("leak.attacker.test", 16, ident=7))
            assert r is not None and r[:2] == b"\x00\x07" and r[3] & 0xF == 5
            assert await _udp_ask(port, b"short") is None  # <12 bytes: no reply
            # TCP: several queries on one connection, then an oversize frame closes it.
            rd, wr = await asyncio.open_connection("127.0.0.1", port)
            wr.write(dnsmsg.frame(query("a.test", 1, ident=1)) + dnsmsg.frame(query("b.test", 28, ident=2)))
            await wr.drain()
            got = []
            for _ in range(2):
                n = struct.unpack("!H", await rd.readexactly(2))[0]
                got.append(await rd.readexactly(n))
            assert [g[:2] for g in got] == [b"\x00\x01", b"\x00\x02"]
            wr.write(struct.pack("!H", MAX_TCP_FRAME + 1) + b"x" * 100)
            await wr.drain()
            assert await asyncio.wait_for(rd.read(), 3) == b""  # closed
            wr.close()
            # The stub is still alive after all that.
            assert (await _udp_ask(port, query("after.test")))[3] & 0xF == 5
        finally:
            await stub.aclose()

    run(main())
    assert ("leak.attacker.test", 16) in seen and ("b.test", 28) in seen


def test_stub_serves_handed_sockets_and_failing_reporter_is_harmless():
    async def main():
        for _ in range(50):  # an ephemeral UDP port whose TCP twin is free (as the planter does)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", port))
                break
            except OSError:
                udp.close()
                tcp.close()
        tcp.listen(8)

        def boom(n, t, answered):
            raise RuntimeError("reporter failure")

        stub = DnsStub(on_query=boom)
        await stub.serve_sockets(udp, tcp)
        try:
            r = await _udp_ask(port, query("x.test"))
            assert r is not None and r[3] & 0xF == 5
            rd, wr = await asyncio.open_connection("127.0.0.1", port)
            wr.write(dnsmsg.frame(query("y.test", ident=9)))
            n = struct.unpack("!H", await rd.readexactly(2))[0]
            assert (await rd.readexactly(n))[:2] == b"\x00\x09"
            wr.close()
        finally:
            await stub.aclose()

    run(main())


def test_stub_forwards_nothing_to_a_recording_resolver():
    """ATTACKS C.3 24: queries to the stub never leave it (a recording resolver stand-in sees nothing)."""

    async def main():
        received = []

        class Rec(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                received.append(data)

        loop = asyncio.get_running_loop()
        tr, _ = await loop.create_datagram_endpoint(Rec, local_addr=("127.0.0.1", 0))
        stub = DnsStub()
        port = await stub.serve_address()
        try:
            for name in ("secret.root.attacker.test", "x.example.com"):
                assert (await _udp_ask(port, query(name)))[3] & 0xF == 5
            await asyncio.sleep(0.2)
        finally:
            await stub.aclose()
            tr.close()
        return received

    assert run(main()) == []


def test_property_served_stub_answers_every_datagram_refused():
    """Hypothesis through the real UDP socket: any datagram ≥12 bytes gets exactly the refusal,
    shorter ones get nothing, and the stub keeps serving."""
    import threading

    from hypothesis import HealthCheck

    loop = asyncio.new_event_loop()
    stub = DnsStub()
    port = loop.run_until_complete(stub.serve_address("127.0.0.1", 0))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=700), st.builds(lambda n, t, i: query(n, t, ident=i),
                                                          st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
                                                          st.integers(0, 65535), st.integers(0, 65535))))
    def check(data):
        client.sendto(data, ("127.0.0.1", port))
        if len(data) < 12:
            client.settimeout(0.05)
            try:
                client.recv(4096)
                raise AssertionError("reply to a short message")
            except socket.timeout:
                pass
            finally:
                client.settimeout(2)
            return
        r = client.recv(4096)
        assert r == dnsmsg.refusal(data)
        ident, flags, qd, an, ns, ar, rest = parse_reply(r)
        assert ident == struct.unpack_from("!H", data)[0] and flags & 0xF == 5 and (an, ns, ar) == (0, 0, 0)

    try:
        check()
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(stub.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()

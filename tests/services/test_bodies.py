"""Request bodies between the agent and an upstream (DESIGN §5.7, firma.services.bodies): a
Content-Length body with placeholders to look for is held and scanned (`hold`); a streamed one
is scanned as payload and stopped before a placeholder's last byte, however the placeholder is
split across reads or chunks (`send_request_body`). Real loopback socket pairs wrapped as
`netio.Stream`, as the sidecar has them."""

from __future__ import annotations

import asyncio

import pytest

from firma.core import http1
from firma.services import bodies, netio

PH = b"firma-cred-github-" + b"0123456789abcdef" * 2
PH2 = b"firma-cred-npm-" + b"fedcba9876543210" * 2
NEEDLES = {"github": PH, "npm": PH2}
NEAR = PH[:-1] + b"X"  # the same length, one byte off: not a placeholder
IDLE = 5.0
MAX_BODY = 1 << 20


def run(coro):
    return asyncio.run(coro)


async def stream_pair() -> tuple[netio.Stream, netio.Stream]:
    """Both ends of one loopback TCP connection, each as a netio.Stream."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    async def on_conn(r, w):
        accepted.set_result(netio.Stream(r, w))

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, limit=netio.STREAM_LIMIT)
    port = srv.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=netio.STREAM_LIMIT)
    far = await asyncio.wait_for(accepted, 5)
    srv.close()
    return netio.Stream(r, w), far


async def setup():
    """(agent, src, dst, dest): the agent writes into src (the sidecar's side of the agent's
    connection); the sidecar writes into dst, whose far end `dest` is the upstream."""
    agent, src = await stream_pair()
    dst, dest = await stream_pair()
    return agent, src, dst, dest


async def feed(agent: netio.Stream, pieces, close: bool = False) -> None:
    for p in pieces:
        agent.w.write(p)
        await agent.w.drain()
        await asyncio.sleep(0.01)  # pacing only: separate reads are likely, never required
    if close:
        agent.w.close()


async def read_all(s: netio.Stream) -> bytes:
    return await asyncio.wait_for(s.r.read(), IDLE)


def closeall(*streams):
    for s in streams:
        s.close()


# ---------------------------------------------------------------------------------------- hold


def test_hold_without_needles_or_not_length_framed_or_too_long_is_not_held():
    async def main():
        agent, src, dst, dest = await setup()
        src.buf += b"untouched"
        out = [
            await bodies.hold(src, http1.Framing("length", 9), idle=IDLE, needles={}),
            await bodies.hold(src, http1.Framing("chunked"), idle=IDLE, needles=NEEDLES),
            await bodies.hold(src, http1.Framing("length", bodies.HOLD_MAX + 1), idle=IDLE, needles=NEEDLES),
            await bodies.hold(src, http1.Framing("none"), idle=IDLE, needles=NEEDLES),
            await bodies.hold(src, http1.Framing("length", 9), idle=IDLE, needles={}, expects_continue=True),
        ]
        left = bytes(src.buf)
        src.close()
        got_by_agent = await read_all(agent)  # no 100 Continue was sent for a body not held
        # control: a held body does consume it
        agent2, src2, dst2, dest2 = await setup()
        src2.buf += b"untouched"
        held = await bodies.hold(src2, http1.Framing("length", 9), idle=IDLE, needles=NEEDLES)
        closeall(agent, dst, dest, agent2, src2, dst2, dest2)
        return out, left, got_by_agent, held

    out, left, got_by_agent, held = run(main())
    assert out == [(None, "")] * 5
    assert left == b"untouched" and got_by_agent == b""
    assert held == (b"untouched", "")


def test_hold_returns_a_clean_body_and_leaves_the_next_request():
    body = b"A" * 100 + NEAR + b"B" * 100

    async def main():
        agent, src, dst, dest = await setup()
        src.buf += body[:50]
        task = asyncio.ensure_future(bodies.hold(src, http1.Framing("length", len(body)), idle=IDLE, needles=NEEDLES))
        await feed(agent, [body[50:120], body[120:] + b"GET /next HTTP/1.1\r\n\r\n"])
        res = await task
        nxt = await src.read_head(1 << 16)
        closeall(agent, src, dst, dest)
        return res, nxt

    res, nxt = run(main())
    assert res == (body, "")
    assert nxt == b"GET /next HTTP/1.1\r\n\r\n"


def test_hold_at_exactly_hold_max_is_held():
    body = (b"0123456789abcdef" * (bodies.HOLD_MAX // 16 + 1))[: bodies.HOLD_MAX]

    async def main():
        agent, src, dst, dest = await setup()
        task = asyncio.ensure_future(bodies.hold(src, http1.Framing("length", len(body)), idle=IDLE, needles=NEEDLES))
        agent.w.write(body)
        await agent.w.drain()
        res = await task
        closeall(agent, src, dst, dest)
        return res

    data, why = run(main())
    assert why == "" and data == body


@pytest.mark.parametrize("cut", [1, len(PH) // 2, len(PH) - 1])
@pytest.mark.parametrize("name, needle", [("github", PH), ("npm", PH2)])
def test_hold_refuses_a_placeholder_split_across_reads(cut, name, needle):
    body = b"A" * 100 + needle + b"B" * 100

    async def main():
        agent, src, dst, dest = await setup()
        src.buf += body[: 100 + cut]  # what the head read took with it: the first read ends mid-placeholder
        task = asyncio.ensure_future(bodies.hold(src, http1.Framing("length", len(body)), idle=IDLE, needles=NEEDLES))
        await feed(agent, [body[100 + cut:]])
        res = await task
        closeall(agent, src, dst, dest)
        return res

    assert run(main()) == (None, f"credential_exfiltration:{name}")


def test_hold_truncated_body():
    async def main():
        agent, src, dst, dest = await setup()
        task = asyncio.ensure_future(bodies.hold(src, http1.Framing("length", 100), idle=IDLE, needles=NEEDLES))
        await feed(agent, [b"x" * 40], close=True)
        res = await task
        closeall(src, dst, dest)
        return res

    assert run(main()) == (None, "client_body_truncated")


def test_hold_answers_100_continue_before_reading():
    async def main():
        agent, src, dst, dest = await setup()
        task = asyncio.ensure_future(bodies.hold(src, http1.Framing("length", 5), idle=IDLE, needles=NEEDLES,
                                                 expects_continue=True))
        interim = await asyncio.wait_for(agent.r.readuntil(b"\r\n\r\n"), IDLE)  # the agent waits for it
        await feed(agent, [b"hello"])
        res = await task
        closeall(agent, src, dst, dest)
        return interim, res

    interim, res = run(main())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert res == (b"hello", "")


# --------------------------------------------------------------------- send_request_body: length


async def send_length(body: bytes, seed: int, pieces: list[bytes], needles) -> tuple[str, bytes, bool]:
    """Send `body` (Content-Length) with its first `seed` bytes already in src.buf and the rest
    written in `pieces`; (reason, what the destination got up to EOF, dst closed by the sender)."""
    agent, src, dst, dest = await setup()
    src.buf += body[:seed]
    task = asyncio.ensure_future(bodies.send_request_body(src, dst, http1.Framing("length", len(body)), max_body=MAX_BODY,
                                                          idle=IDLE, needles=needles))
    await feed(agent, pieces)
    why = await task
    closed = dst.w.is_closing()
    if not closed:
        await dst.w.drain()
        dst.close()
    got = await read_all(dest)
    closeall(agent, src, dest)
    return why, got, closed


def split(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@pytest.mark.parametrize("cut", [1, 7, len(PH) // 2, len(PH) - 1])
def test_length_body_with_a_placeholder_split_across_reads_is_stopped_before_it(cut):
    pre = b"A" * 3000
    body = pre + PH + b"B" * 3000
    at = len(pre) + cut
    rest = body[at:]
    why, got, closed = run(send_length(body, at, split(rest, 5, 11), NEEDLES))
    assert why == "credential_exfiltration:github"
    assert closed
    assert PH not in got and PH[:cut + 1] not in got  # not even the placeholder's part after the cut
    assert body.startswith(got) and len(got) < at + 1


def test_length_body_placeholder_arriving_in_tiny_pieces():
    pre = b"A" * 64
    body = pre + PH + b"tail"
    pieces = [body[i:i + 3] for i in range(0, len(body), 3)]
    why, got, closed = run(send_length(body, 0, pieces, NEEDLES))
    assert why == "credential_exfiltration:github" and closed
    assert PH not in got and body.startswith(got)


def test_length_body_without_a_placeholder_is_forwarded_byte_exact():
    pre = b"A" * 3000
    body = pre + NEAR + b"B" * 3000 + PH[:-1]  # a near miss, and a prefix at the very end
    at = len(pre) + 10
    why, got, closed = run(send_length(body, at, split(body[at:], 5, 11), NEEDLES))
    assert why == "" and not closed and got == body


def test_length_body_with_a_placeholder_passes_without_needles():
    # control: the refusal above comes from the scan, not from the framing or the split
    body = b"A" * 3000 + PH + b"B" * 3000
    why, got, closed = run(send_length(body, 3005, split(body[3005:], 5, 11), {}))
    assert why == "" and got == body


def test_length_body_truncated_closes_dst():
    async def main():
        agent, src, dst, dest = await setup()
        task = asyncio.ensure_future(bodies.send_request_body(src, dst, http1.Framing("length", 100), max_body=MAX_BODY,
                                                              idle=IDLE, needles=NEEDLES))
        await feed(agent, [b"x" * 40], close=True)
        why = await task
        got = await read_all(dest)
        closeall(src, dest)
        return why, dst.w.is_closing(), got

    why, closed, got = run(main())
    assert why == "client_body_truncated" and closed
    assert len(got) <= 40 and got == b"x" * len(got)


def test_held_bytes_are_written_as_given_and_src_is_not_read():
    async def main():
        agent, src, dst, dest = await setup()
        src.buf += b"NEXT REQUEST BYTES"
        held = b"held \x00 body " + PH  # the caller scanned it: written exactly as given
        why = await bodies.send_request_body(src, dst, http1.Framing("length", len(held)), max_body=MAX_BODY, idle=IDLE,
                                             needles=NEEDLES, held=held)
        closed = dst.w.is_closing()
        dst.close()
        got = await read_all(dest)
        left = bytes(src.buf)
        closeall(agent, src, dest)
        return why, closed, got, left, held

    why, closed, got, left, held = run(main())
    assert why == "" and not closed and got == held
    assert left == b"NEXT REQUEST BYTES"


def test_no_body_sends_nothing():
    async def main():
        agent, src, dst, dest = await setup()
        src.buf += b"GET /next"
        why = await bodies.send_request_body(src, dst, http1.Framing("none"), max_body=MAX_BODY, idle=IDLE, needles=NEEDLES)
        dst.close()
        got = await read_all(dest)
        left = bytes(src.buf)
        closeall(agent, src, dest)
        return why, got, left

    assert run(main()) == ("", b"", b"GET /next")


# -------------------------------------------------------------------- send_request_body: chunked


def chunked(*parts: bytes, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts if p)
    return out + b"0\r\n" + trailer + b"\r\n"


def decode(wire: bytes) -> tuple[bytes, bool, int]:
    sc = http1.ChunkedScanner(decode=True)
    n = sc.feed(wire)
    assert sc.payload is not None
    return bytes(sc.payload), sc.done, n


async def send_chunked(wire: bytes, seed: int, cuts: list[int], needles, max_body: int = MAX_BODY):
    agent, src, dst, dest = await setup()
    src.buf += wire[:seed]
    task = asyncio.ensure_future(bodies.send_request_body(src, dst, http1.Framing("chunked"), max_body=max_body, idle=IDLE,
                                                          needles=needles))
    await feed(agent, split(wire[seed:], *[c - seed for c in cuts]))
    why = await task
    closed = dst.w.is_closing()
    if not closed:
        await dst.w.drain()
        dst.close()
    got = await read_all(dest)
    left = bytes(src.buf)
    closeall(agent, src, dest)
    return why, got, closed, left


def size_line_cuts(wire: bytes) -> list[int]:
    """Offsets that fall inside chunk-size lines (between a size's digits and its CRLF)."""
    cuts = []
    i = 0
    while True:
        j = wire.find(b"\r\n", i)
        if j < 0:
            break
        line = wire[i:j]
        if line and all(c in b"0123456789abcdef" for c in line.split(b";")[0]):
            cuts.append(i + 1)  # just after the first size digit
            size = int(line.split(b";")[0], 16)
            i = j + 2 + size + 2
        else:
            i = j + 2
        if size == 0:
            break
    return cuts


PAYLOAD = b"x" * 50 + PH + b"y" * 50


@pytest.mark.parametrize("sizes", [
    (55, 3, 7),  # the placeholder spread over three chunks
    (50, 1, 1, 1, 1, 1),  # chunk boundaries right where it begins
    (len(b"x" * 50 + PH) - 1, 1),  # all but its last byte in the first chunk
    (45,) + (1,) * 20,  # one byte per chunk around its start
])
def test_chunked_placeholder_split_across_chunks_and_size_lines_is_refused(sizes):
    parts, pos = [], 0
    for s in sizes:
        parts.append(PAYLOAD[pos:pos + s])
        pos += s
    parts.append(PAYLOAD[pos:])
    wire = chunked(*parts)
    cuts = size_line_cuts(wire)
    why, got, closed, _ = run(send_chunked(wire, cuts[0], cuts[1:], NEEDLES))
    assert why == "credential_exfiltration:github"
    assert closed
    assert PH not in got  # not on the wire…
    payload, done, _ = decode(got)
    assert PH not in payload and not done  # …nor in what the upstream decodes, which is unfinished
    assert PAYLOAD.startswith(payload)


@pytest.mark.parametrize("sizes", [(55, 3, 7), (45,) + (1,) * 20])
def test_chunked_without_a_placeholder_is_forwarded_as_the_same_message(sizes):
    payload = PAYLOAD.replace(PH, NEAR)
    parts, pos = [], 0
    for s in sizes:
        parts.append(payload[pos:pos + s])
        pos += s
    parts.append(payload[pos:])
    wire = chunked(*parts, ext=b";a=b")
    cuts = size_line_cuts(wire)
    why, got, closed, left = run(send_chunked(wire + b"GET /next HTTP/1.1\r\n\r\n", cuts[0], cuts[1:], NEEDLES))
    assert why == "" and not closed
    dec, done, n = decode(got)
    assert done and n == len(got)  # one complete chunked message, nothing after it
    assert dec == payload
    assert left == b"GET /next HTTP/1.1\r\n\r\n"  # the next pipelined request is kept for the agent


def test_chunked_with_a_placeholder_passes_raw_without_needles():
    # control: without needles the chunked body is forwarded as sent (the framing's exact bytes)
    wire = chunked(PAYLOAD[:55], PAYLOAD[55:58], PAYLOAD[58:], ext=b";x=1", trailer=b"X-T: 1\r\n")
    why, got, closed, left = run(send_chunked(wire + b"NEXT", 3, [10, 40], {}))
    assert why == "" and got == wire and left == b"NEXT"


def test_chunked_placeholder_in_framing_never_reaches_the_upstream():
    # A placeholder in a chunk extension or a trailer is framing, not payload: the re-chunked
    # message would not carry it, but it is an attempt all the same, refused as one.
    for wire in (chunked(b"hello", b"world", ext=b";k=" + PH),
                 chunked(b"hello", b"world", trailer=b"X-Leak: " + PH2 + b"\r\n")):
        why, got, closed, _ = run(send_chunked(wire, 2, [20], NEEDLES))
        assert why.startswith("credential_exfiltration:") and closed, why
        assert PH not in got and PH2 not in got
    # control: the same framing without a placeholder goes through
    why, got, closed, _ = run(send_chunked(chunked(b"hello", b"world", ext=b";k=v"), 2, [20], NEEDLES))
    assert why == "" and decode(got)[0] == b"helloworld"


def test_chunked_too_large_and_malformed_close_dst():
    big = chunked(b"a" * 600, b"b" * 600)
    why, got, closed, _ = run(send_chunked(big, 0, [700], NEEDLES, max_body=1000))
    assert why == "body_too_large" and closed
    assert len(decode(got)[0]) <= 1000
    why, got, closed, _ = run(send_chunked(big, 0, [700], {}, max_body=1000))
    assert why == "body_too_large" and closed
    why, got, closed, _ = run(send_chunked(b"5\r\nhello\r\nzz\r\n", 0, [], NEEDLES))
    assert why == "bad_chunk" and closed and b"zz" not in got
    # control: the same body within the limit goes through
    why, got, closed, _ = run(send_chunked(big, 0, [700], NEEDLES, max_body=1200))
    assert why == "" and decode(got)[0] == b"a" * 600 + b"b" * 600


def test_chunked_truncated_closes_dst():
    async def main():
        agent, src, dst, dest = await setup()
        task = asyncio.ensure_future(bodies.send_request_body(src, dst, http1.Framing("chunked"), max_body=MAX_BODY,
                                                              idle=IDLE, needles=NEEDLES))
        await feed(agent, [b"a\r\n01234"], close=True)
        why = await task
        await read_all(dest)
        closeall(src, dest)
        return why, dst.w.is_closing()

    assert run(main()) == ("client_body_truncated", True)

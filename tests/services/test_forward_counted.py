"""`netio.forward_counted` (the inspected path's response bodies, DESIGN §5.7): exactly n bytes
reach the agent, read straight into one buffer, and the upstream connection goes back to its
stream reader with what follows the body intact (the next response on a kept-alive connection),
over plain TCP and over TLS. Control: a body cut short raises instead of passing as complete."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading

import pytest
import trustme

from firma.services import netio

NEXT = b"HTTP/1.1 204 No Content\r\n\r\n"


def _serve(payloads: list[bytes], ctx: ssl.SSLContext | None, hold: bool = True) -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def one() -> None:
        raw, _ = srv.accept()
        c = ctx.wrap_socket(raw, server_side=True) if ctx else raw
        with c:
            for p in payloads:
                c.sendall(p)
            if hold:
                c.recv(1)  # hold the connection open until the client is done
        srv.close()

    threading.Thread(target=one, daemon=True).start()
    return srv.getsockname()[1]


async def _forward(body: bytes, payloads: list[bytes], ctx: ssl.SSLContext | None, client_ctx) -> tuple[bytes, bytes]:
    port = _serve(payloads, ctx)
    kw = {"ssl": client_ctx, "server_hostname": "up.example.test"} if client_ctx else {}
    ur, uw = await asyncio.open_connection("127.0.0.1", port, limit=netio.STREAM_LIMIT, **kw)
    up = netio.Stream(ur, uw)
    a, b = socket.socketpair()
    ar, aw = await asyncio.open_connection(sock=a)
    got = bytearray()
    loop = asyncio.get_running_loop()
    b.setblocking(False)

    async def drain_agent() -> None:
        while len(got) < len(body):
            got.extend(await loop.sock_recv(b, 1 << 20))

    reader = asyncio.ensure_future(drain_agent())
    await netio.forward_counted(up, aw, len(body), 10)
    await asyncio.wait_for(reader, 10)
    head = await asyncio.wait_for(up.read_head(65536), 10)  # the stream reader is back
    uw.close()
    aw.close()
    b.close()
    return bytes(got), head or b""


def _tls():
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("up.example.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("size", [10, 3 << 20])
def test_the_body_then_the_next_response(tls, size):
    body = os.urandom(size)
    server, client = _tls() if tls else (None, None)
    # the body and the next response in one write (some of it read along with the head) and apart
    for payloads in ([body + NEXT], [body[:5], body[5:], NEXT]):
        got, head = asyncio.run(_forward(body, payloads, server, client))
        assert got == body and head == NEXT


def test_a_body_cut_short_is_an_error():
    async def main() -> None:
        port = _serve([b"abc"], None, hold=False)  # 3 bytes of 10, then the upstream closes
        ur, uw = await asyncio.open_connection("127.0.0.1", port)
        a, b = socket.socketpair()
        _ar, aw = await asyncio.open_connection(sock=a)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(netio.forward_counted(netio.Stream(ur, uw), aw, 10, 10), 10)
        uw.close()
        aw.close()
        b.close()

    asyncio.run(main())


@pytest.mark.parametrize("tls", [False, True])
def test_a_slow_agent_holds_the_body_back_and_gets_it_whole(tls):
    """The agent reads nothing for a while, then slowly: the upstream is read only as fast as the
    agent takes it (the agent side's backlog stays near its high-water mark plus one read, never
    the body), every byte arrives, and both connections keep their own protocols afterwards."""
    size = 24 << 20
    body = os.urandom(size)
    server, client = _tls() if tls else (None, None)

    async def main() -> tuple[bytes, bytes, int, bytes]:
        port = _serve([body + NEXT], server)
        kw = {"ssl": client, "server_hostname": "up.example.test"} if client else {}
        ur, uw = await asyncio.open_connection("127.0.0.1", port, limit=netio.STREAM_LIMIT, **kw)
        a, b = socket.socketpair()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        ar, aw = await asyncio.open_connection(sock=a)
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        got = bytearray()
        backlog = 0

        async def agent() -> None:
            await asyncio.sleep(0.3)  # everything would back up into the relay meanwhile
            while len(got) < size:
                got.extend(await loop.sock_recv(b, 1 << 16))
                if len(got) < size // 2:
                    await asyncio.sleep(0.0005)

        async def watch() -> None:
            nonlocal backlog
            while True:
                backlog = max(backlog, aw.transport.get_write_buffer_size())
                await asyncio.sleep(0.001)

        reader, watcher = asyncio.ensure_future(agent()), asyncio.ensure_future(watch())
        up = netio.Stream(ur, uw)
        await netio.forward_counted(up, aw, size, 10)
        await asyncio.wait_for(reader, 30)
        watcher.cancel()
        head = await asyncio.wait_for(up.read_head(65536), 10)
        await loop.sock_sendall(b, b"next request")  # the agent side's stream reader is back too
        after = await asyncio.wait_for(ar.readexactly(12), 10)
        uw.close()
        aw.close()
        b.close()
        return bytes(got), head or b"", backlog, after

    got, head, backlog, after = asyncio.run(main())
    assert got == body and head == NEXT and after == b"next request"
    assert backlog <= (64 << 10) + netio.RELAY_BUFFER_BULK + (256 << 10), backlog

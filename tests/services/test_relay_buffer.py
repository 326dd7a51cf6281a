"""The tunnel relay's shared read buffer (services.netio.relay): a bulk download under
backpressure (a reader that stalls, so the agent's side cannot take everything written) arrives
byte for byte — a buffer reused while a transport still held a view of it would corrupt it — and
so does a chatty exchange of small messages both ways."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

from firma.services import netio

SIZE = 24 << 20


def _upstream(payload: bytes) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(64)
            c.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


async def _relay_once(payload: bytes, stall: float) -> tuple[bytes, netio.Activity]:
    srv, up_port = _upstream(payload)
    act = netio.Activity()

    async def handle(r, w) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
        await netio.relay(netio.Stream(r, w), netio.Stream(ur, uw), 30, 300, act)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got = bytearray()

    def client() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(b"GET\r\n")
        time.sleep(stall)  # everything backs up into the relay's write buffers meanwhile
        while data := s.recv(1 << 16):
            got.extend(data)
            if len(got) < SIZE // 2:
                time.sleep(0.0005)  # a slow reader for the first half
        s.close()

    t = threading.Thread(target=client)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.05)
    server.close()
    srv.close()
    return bytes(got), act


def test_a_bulk_download_under_backpressure_arrives_intact():
    payload = os.urandom(SIZE)
    got, act = asyncio.run(_relay_once(payload, stall=0.3))
    assert len(got) == SIZE and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert act.down == SIZE and act.up == 5


def test_small_messages_both_ways_arrive_in_order():
    async def main() -> list[bytes]:
        async def echo(r, w) -> None:
            while line := await r.readline():
                w.write(line.upper())
                await w.drain()
            w.close()

        up = await asyncio.start_server(echo, "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]

        async def handle(r, w) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
            await netio.relay(netio.Stream(r, w), netio.Stream(ur, uw), 30, 300, netio.Activity())

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        out = []
        for i in range(200):
            w.write(b"line %d\n" % i)
            await w.drain()
            out.append(await asyncio.wait_for(r.readline(), 10))
        w.close()
        server.close()
        up.close()
        return out

    assert asyncio.run(main()) == [b"LINE %d\n" % i for i in range(200)]

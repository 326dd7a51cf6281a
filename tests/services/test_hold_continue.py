"""A body held for the placeholder scan (DESIGN §5.7) from a client that sent `Expect:
100-continue`: firma answers `100 Continue` itself, since the client sends nothing before it and
the upstream has not seen the request yet. Control: without the expectation nothing is written."""

from __future__ import annotations

import asyncio
import socket

from firma.core import http1
from firma.services import bodies, netio

NEEDLES = {"github": b"firma-cred-github-0123456789abcdef0123456789abcdef"}
BODY = b"a=1&b=2"


async def _held(expects_continue: bool) -> tuple[bytes | None, str, bytes]:
    mine, agent = socket.socketpair()
    r, w = await asyncio.open_connection(sock=mine)
    s = netio.Stream(r, w)
    loop = asyncio.get_running_loop()
    agent.setblocking(False)

    async def client() -> bytes:
        got = b""
        if expects_continue:  # a client that waits for 100 Continue before its body
            while b"\r\n\r\n" not in got:
                got += await asyncio.wait_for(loop.sock_recv(agent, 100), 10)
        await loop.sock_sendall(agent, BODY)
        return got

    task = asyncio.ensure_future(client())
    held, why = await bodies.hold(s, http1.Framing("length", len(BODY)), idle=10, needles=NEEDLES,
                                  expects_continue=expects_continue)
    seen = await task
    await asyncio.sleep(0)
    try:
        seen += agent.recv(100)
    except BlockingIOError:
        pass
    w.close()
    agent.close()
    return held, why, seen


def test_firma_answers_100_continue_for_a_held_body():
    held, why, seen = asyncio.run(_held(True))
    assert (held, why) == (BODY, "") and seen == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_without_the_expectation_nothing_is_written_to_the_agent():
    held, why, seen = asyncio.run(_held(False))
    assert (held, why) == (BODY, "") and seen == b""  # control

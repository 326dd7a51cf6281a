"""Property: no byte sequence sent to the bridge crashes it, gets past it to an upstream, or
leaves a connection hanging; every answer is an HTTP response or a close."""

import asyncio
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upstreams import HttpUpstream, Stack

PREFIXES = [b"", b"GET ", b"CONNECT ", b"POST http://127.0.0.1/ HTTP/1.1\r\n", b"GET http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"]


def test_property_bridge_survives_arbitrary_input(tmp_path):
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def call(coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    up = call(HttpUpstream().start())
    stack = Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"])
    call(stack.__aenter__())

    async def exchange(data: bytes) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", stack.bridge_port)
        w.write(data)
        await w.drain()
        w.write_eof()
        out = await asyncio.wait_for(r.read(), 10)
        w.close()
        return out

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(PREFIXES), st.binary(max_size=300))
    def check(prefix, data):
        out = call(exchange(prefix + data))
        assert out == b"" or out.startswith(b"HTTP/1.1 ")

    try:
        check()
        # still serving afterwards
        ok = call(exchange(f"GET http://127.0.0.1:{up.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode()))
        assert ok.startswith(b"HTTP/1.1 200")
    finally:
        call(stack.__aexit__(None, None, None))
        call(up.aclose())
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
    assert up.rec.connections == 1  # only the final, deliberate request reached the upstream

"""How tunnel bytes are best moved on this machine (DESIGN §5.4): one large download relayed by
firma's asyncio relay (services.netio.relay, what the sidecar uses), by blocking threads with
1 MiB buffers, and by os.splice through a pipe, next to the direct download, in one run
(interleaved rounds, medians). Everything on host loopback."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from firma.services import netio


def upstream(size: int) -> int:
    body = memoryview(bytes(size))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def one(c: socket.socket) -> None:
        try:
            c.recv(1024)
            for i in range(0, size, 4 << 20):
                c.sendall(body[i:i + (4 << 20)])
        finally:
            c.close()

    def serve() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def listener(handler) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def thread_relay(up_port: int):
    def copy(a: socket.socket, b: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            while k := a.recv_into(buf):
                b.sendall(memoryview(buf)[:k])
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def handle(c: socket.socket) -> None:
        u = socket.create_connection(("127.0.0.1", up_port))
        threading.Thread(target=copy, args=(c, u), daemon=True).start()
        copy(u, c)

    return handle


def splice_relay(up_port: int):
    def copy(a: socket.socket, b: socket.socket) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(a.fileno(), w, 1 << 20)
                if not n:
                    break
                while n:
                    n -= os.splice(r, b.fileno(), n)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)

    def handle(c: socket.socket) -> None:
        u = socket.create_connection(("127.0.0.1", up_port))
        threading.Thread(target=copy, args=(c, u), daemon=True).start()
        copy(u, c)

    return handle


def asyncio_relay(up_port: int) -> int:
    ready = threading.Event()
    port: list[int] = []

    async def handle(r, w) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", up_port, limit=netio.STREAM_LIMIT)
        await netio.relay(netio.Stream(r, w), netio.Stream(ur, uw), 60, 600, netio.Activity())

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, limit=netio.STREAM_LIMIT)
        port.append(srv.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    ready.wait()
    return port[0]


def download(port: int, size: int) -> float:
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET\r\n")
    buf = bytearray(1 << 20)
    got = 0
    while k := s.recv_into(buf):
        got += k
    s.close()
    assert got == size, got
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.mib << 20
    up = upstream(size)
    rows = {"direct": up, "threads, 1 MiB buffers": listener(thread_relay(up)),
            "os.splice through a pipe": listener(splice_relay(up)), "asyncio relay (netio.relay, firma's)": asyncio_relay(up)}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, port in rows.items():
            times[name].append(download(port, size))
    base = statistics.median(times["threads, 1 MiB buffers"])
    print(f"relay copy benchmark: {args.mib} MiB, median of {args.rounds} interleaved rounds, {os.cpu_count()} CPUs")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<40} {args.mib / med:8.0f} MiB/s  {base / med:5.2f} × threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())

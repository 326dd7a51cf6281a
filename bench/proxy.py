"""Sidecar overhead benchmark (not a test): prints one table, everything measured in this run
against direct loopback access to the same upstream.

  added p50/p99 latency of a small GET (new connection per request, as curl does)
  throughput of a 256 MiB download: direct, through the sidecar (plain HTTP), through CONNECT
  policy decision p50/p95 (allow_hosts only, and with a Cedar policy)

Goals: added p50 <= 2 ms, throughput >= 50 % of direct, decision p95 <= 200 us.
The upstream and the sidecar (`firma sidecar`) run as separate processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIG = 256 * 1024 * 1024
HOSTHDR = "127.0.0.1"
SMALL_N = 400
ROUNDS = 5

UPSTREAM = r"""
import asyncio, sys
BLOCK = b"z" * (1 << 20)
BIG = int(sys.argv[1])
async def client(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /big"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                left = BIG
                while left:
                    n = min(left, len(BLOCK))
                    w.write(BLOCK[:n]); left -= n
                    await w.drain()
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"s" * 100)
                await w.drain()
            if b"onnection: close" in head:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(client, "127.0.0.1", 0, backlog=1024)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


BRIDGE = r"""
import asyncio, sys
from firma.services.bridge import Bridge
async def main():
    b = Bridge(sidecar_endpoint=sys.argv[1], attribution={"x-firma-sandbox-id": "sbx_bench"})
    print(await b.serve_address("127.0.0.1", 0), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def read_response(r: asyncio.StreamReader) -> int:
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    got = 0
    while got < n:
        chunk = await r.read(min(1 << 20, n - got))
        if not chunk:
            raise ConnectionError("short body")
        got += len(chunk)
    return got


async def small_get(port: int, target: str) -> float:
    t = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {target} HTTP/1.1\r\nHost: {HOSTHDR}\r\nConnection: close\r\n\r\n".encode())
    await read_response(r)
    w.close()
    return time.perf_counter() - t


async def download(port: int, target: str, connect: str | None = None) -> float:
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    if connect:
        w.write(f"CONNECT {connect} HTTP/1.1\r\n\r\n".encode())
        await r.readuntil(b"\r\n\r\n")
    t = time.perf_counter()
    w.write(f"GET {target} HTTP/1.1\r\nHost: {HOSTHDR}\r\nConnection: close\r\n\r\n".encode())
    n = await read_response(r)
    dt = time.perf_counter() - t
    w.close()
    assert n == BIG
    return BIG / dt / (1 << 20)


def decisions() -> tuple[list[float], list[float]]:
    from firma.core.policy import HTTP_REQUEST, Policy, Request

    hosts = [f"h{i}.example.com" for i in range(50)]
    p1 = Policy(hosts + ["*.api.example.org"])
    cedar = 'permit(principal, action == Action::"http.request", resource) when { resource.host like "*.example.net" };\n' \
            'forbid(principal, action, resource) when { resource.path like "/admin*" };'
    p2 = Policy(hosts, cedar)
    out = []
    for p in (p1, p2):
        xs = []
        for i in range(3000):
            req = Request(HTTP_REQUEST, f"h{i % 60}.example.com", 443, "GET", "/x", "agent")
            t = time.perf_counter_ns()
            p.decide(req)
            xs.append((time.perf_counter_ns() - t) / 1000)
        out.append(xs[200:])
    return out[0], out[1]


async def main() -> None:
    tmp = tempfile.mkdtemp(prefix="firma-bench-")
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(BIG)], stdout=subprocess.PIPE, text=True)
    sc = br = None
    try:
        uport = int(up.stdout.readline())
        global HOSTHDR
        HOSTHDR = f"127.0.0.1:{uport}"
        sc = subprocess.Popen(
            [sys.executable, "-m", "firma", "sidecar", "--listen", "tcp://127.0.0.1:0", "--allow-host", f"127.0.0.1:{uport}",
             "--audit", os.path.join(tmp, "audit.jsonl")],
            stdout=subprocess.PIPE, text=True,
        )
        endpoint = sc.stdout.readline().strip()
        sport = int(endpoint.rsplit(":", 1)[1])
        br = subprocess.Popen([sys.executable, "-c", BRIDGE, endpoint], stdout=subprocess.PIPE, text=True)
        bport = int(br.stdout.readline())
        base = f"http://127.0.0.1:{uport}"
        for _ in range(30):  # warm-up
            await small_get(uport, "/small")
            await small_get(sport, base + "/small")
        direct, via = [], []
        for _ in range(SMALL_N):  # interleaved so both see the same machine state
            direct.append(await small_get(uport, "/small"))
            via.append(await small_get(sport, base + "/small"))
        d50, d99 = pct(direct, 50) * 1e3, pct(direct, 99) * 1e3
        v50, v99 = pct(via, 50) * 1e3, pct(via, 99) * 1e3
        bridged = []
        for _ in range(SMALL_N // 4):
            bridged.append(await small_get(bport, base + "/small"))
        runs: dict[str, list[float]] = {"direct": [], "http": [], "connect": [], "bridge": []}
        for _ in range(ROUNDS):  # interleaved rounds: a busy moment hits all three alike
            runs["direct"].append(await download(uport, "/big"))
            runs["http"].append(await download(sport, base + "/big"))
            runs["connect"].append(await download(sport, "/big", connect=f"127.0.0.1:{uport}"))
            runs["bridge"].append(await download(bport, "/big", connect=f"127.0.0.1:{uport}"))
        tp_direct, tp_http, tp_conn, tp_bridge = (statistics.median(runs[k]) for k in ("direct", "http", "connect", "bridge"))
        a_only, with_cedar = decisions()
    finally:
        if br:
            br.terminate()
            br.wait(10)
        if sc:
            sc.terminate()
            sc.wait(10)
        up.terminate()
        up.wait(10)
    rows = [
        ("small GET p50 (ms)", f"{d50:.3f}", f"{v50:.3f}", f"+{v50 - d50:.3f} ms", "added <= 2 ms", v50 - d50 <= 2),
        ("small GET p99 (ms)", f"{d99:.3f}", f"{v99:.3f}", f"+{v99 - d99:.3f} ms", "", None),
        ("256 MiB plain HTTP (MiB/s)", f"{tp_direct:.0f}", f"{tp_http:.0f}", f"{tp_http / tp_direct:.0%}", ">= 50 %", tp_http / tp_direct >= 0.5),
        ("256 MiB CONNECT (MiB/s)", f"{tp_direct:.0f}", f"{tp_conn:.0f}", f"{tp_conn / tp_direct:.0%}", ">= 50 %", tp_conn / tp_direct >= 0.5),
        ("agent path: bridge+sidecar GET p50 (ms)", f"{d50:.3f}", f"{pct(bridged, 50) * 1e3:.3f}", f"+{pct(bridged, 50) * 1e3 - d50:.3f} ms", "(info)", None),
        ("agent path: bridge+sidecar CONNECT (MiB/s)", f"{tp_direct:.0f}", f"{tp_bridge:.0f}", f"{tp_bridge / tp_direct:.0%}", "(info)", None),
        ("decision p50/p95 allow_hosts (us)", "-", f"{pct(a_only, 50):.1f} / {pct(a_only, 95):.1f}", "", "p95 <= 200 us", pct(a_only, 95) <= 200),
        ("decision p50/p95 + Cedar (us)", "-", f"{pct(with_cedar, 50):.1f} / {pct(with_cedar, 95):.1f}", "", "p95 <= 200 us", pct(with_cedar, 95) <= 200),
    ]
    print(f"firma proxy benchmark ({SMALL_N} small GETs interleaved, {ROUNDS} interleaved rounds of 256 MiB downloads, medians; {os.cpu_count()} CPUs)")
    print(f"{'metric':<42} {'direct':>10} {'sidecar':>16} {'delta/ratio':>13}  {'goal':<14} met")
    for name, a, b, c, goal, ok in rows:
        print(f"{name:<42} {a:>10} {b:>16} {c:>13}  {goal:<14} {'' if ok is None else ('yes' if ok else 'NO')}")


if __name__ == "__main__":
    asyncio.run(main())

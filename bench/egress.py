"""Egress benchmark (DESIGN §5.4): throughput of one large download and the p50 of small GETs,
side by side in one run, through

  direct          the client on the host, straight to the upstream
  bare relay      a host process that only copies bytes (blocking threads, 1 MiB buffers)
  proxy (2 hops)  inside `firma run`: HTTP_PROXY → bridge → sidecar socket → upstream
  transparent IP  inside `firma run`, no proxy: the address dialled → planted listener → the
                  embedded sidecar in the services process (one hop), raw relay (as TLS and
                  opaque tunnels are)
  transparent name  the same to an allowed name (synthetic address), plain HTTP decided per request

Each client resolves its name once and then connects by address, as a client with a DNS cache
does: the rows compare the data path, not lookups.
The upstream serves from memory with large writes on host loopback, so it is not the bottleneck;
names resolve through an injected resolver (never real DNS). Ratios are against the bare relay,
the ceiling for any user-space hop on the same CPUs."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading

CLIENT = r'''
import json, socket, sys, time
host, port, path, n, proxy = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
# Resolved once, as a client with a DNS cache does: the rows compare the data path, not lookups.
addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2]
def get():
    if proxy:
        ph, pp = proxy.rsplit(":", 1)
        s = socket.create_connection((ph, int(pp)))
        req = f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    else:
        s = socket.create_connection(addr)
        req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(req.encode())
    total = 0
    buf = bytearray(1 << 20)
    while True:
        k = s.recv_into(buf)
        if not k:
            break
        total += k
    s.close()
    return total
times, sizes = [], []
for _ in range(n):
    t = time.perf_counter(); sizes.append(get()); times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "sizes": sizes}))
'''

DRIVER = r'''
import json, os, sys
import firma.services.sidecar as sc
table = json.loads(os.environ["BENCH_RESOLVE"])
async def resolve(host, port):
    if host in table:
        return table[host]
    raise OSError("bench resolver: unknown name")
sc.system_resolver = resolve
from firma.cli.main import entry
sys.exit(entry())
'''


class Upstream:
    """HTTP/1.1 from memory: /big is `size` bytes, anything else 2 bytes; one request per connection."""

    def __init__(self, size: int) -> None:
        self.big = memoryview(bytes(size))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1]
            body = self.big if path.endswith(b"/big") else memoryview(b"ok")
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            for i in range(0, len(body), 4 << 20):
                c.sendall(body[i:i + (4 << 20)])
        except OSError:
            pass
        finally:
            c.close()


class BareRelay:
    """Copies bytes between a client and the upstream: blocking threads, 1 MiB buffers."""

    def __init__(self, upstream_port: int) -> None:
        self.up = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.up))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(a: socket.socket, b: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            while True:
                k = a.recv_into(buf)
                if not k:
                    break
                b.sendall(memoryview(buf)[:k])
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def run_client(argv_prefix: list[str], host: str, port: int, path: str, n: int, proxy: str, cwd: str, env: dict) -> dict:
    p = subprocess.run([*argv_prefix, "/usr/bin/python3", "-c", CLIENT, host, str(port), path, str(n), proxy],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"{argv_prefix[:3]}… {host}:{port}{path} failed: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--small", type=int, default=200, help="small GETs per row")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds: one large download and small/rounds GETs per row each")
    args = ap.parse_args()
    up = Upstream(args.size_mib << 20)
    relay = BareRelay(up.port)
    ws = tempfile.mkdtemp(prefix="firma-bench-egress-")
    state = tempfile.mkdtemp(prefix="firma-bench-egress-state-")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "FIRMA_STATE_DIR": state, "BENCH_RESOLVE": json.dumps({"upstream.bench": ["127.0.0.1"]})}
    allow = ["--allow-host", f"127.0.0.1:{up.port}", "--allow-host", f"upstream.bench:{up.port}"]
    firma = [sys.executable, "-c", DRIVER, "run", "--quiet", *allow, "--"]
    sock = os.path.join(state, "bench-sidecar.sock")
    sidecar = subprocess.Popen([sys.executable, "-c", DRIVER, "sidecar", "--listen", f"unix://{sock}", *allow,
                                "--audit", os.path.join(state, "sidecar-audit.jsonl"), "--max-client-rate", "100000"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sidecar.stdout.readline()  # its endpoint, once it serves
    external = [sys.executable, "-c", DRIVER, "run", "--quiet", "--sidecar", f"unix://{sock}", *allow, "--"]
    rows = [
        ("direct", [], "127.0.0.1", up.port, ""),
        ("bare relay", [], "127.0.0.1", relay.port, ""),
        ("proxy, external sidecar (2 hops)", external, "127.0.0.1", up.port, "127.0.0.1:18080"),
        ("proxy (1 hop)", firma, "127.0.0.1", up.port, "127.0.0.1:18080"),
        ("transparent IP (1 hop)", firma, "127.0.0.1", up.port, ""),
        ("transparent name (1 hop, per request)", firma, "upstream.bench", up.port, ""),
    ]
    # Interleaved rounds: every row takes its turn in each round, so a slow spell on this shared
    # machine lands on all rows alike instead of on whichever row ran then.
    big_times: dict[str, list[float]] = {name: [] for name, *_ in rows}
    small_times: dict[str, list[float]] = {name: [] for name, *_ in rows}
    per_round = max(1, args.small // args.rounds)
    for _round in range(args.rounds):
        for name, prefix, host, port, proxy in rows:
            big = run_client(prefix, host, port, "/big", 1, proxy, ws, env)
            assert all(s >= args.size_mib << 20 for s in big["sizes"]), (name, big["sizes"])
            big_times[name] += big["times"]
            small_times[name] += run_client(prefix, host, port, "/small", per_round, proxy, ws, env)["times"]
    results = {name: (statistics.median(args.size_mib / t for t in big_times[name]),
                      statistics.median(small_times[name]) * 1000) for name, *_ in rows}
    sidecar.terminate()
    sidecar.wait(10)
    base_tp, base_p50 = results["bare relay"]
    print(f"egress benchmark: {args.size_mib} MiB download (median of {args.rounds}), {args.small} small GETs "
          f"(new connection each), {args.rounds} interleaved rounds, uid={os.getuid()}, {os.cpu_count()} CPUs")
    hdr = f"{'path':<40} {'MiB/s':>9} {'× direct':>9} {'× relay':>8} {'small GET p50 ms':>17} {'− relay ms':>11}"
    print(hdr)
    print("-" * len(hdr))
    d_tp = results["direct"][0]
    for name, (tp, p50) in results.items():
        print(f"{name:<40} {tp:9.0f} {tp / d_tp:9.2f} {tp / base_tp:8.2f} {p50:17.2f} {p50 - base_p50:11.2f}")
    print("srt: not measured here (not installed)")
    print("goals: agent path ≥ 0.9 × the bare relay's throughput; small-GET p50 ≤ bare relay + 0.3 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

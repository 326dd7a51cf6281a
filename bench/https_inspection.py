"""HTTPS inspection benchmark (DESIGN §5.7): inspected HTTPS next to direct and tunnelled HTTPS,
side by side in one run, through

  direct       the client on the host, TLS straight to the upstream
  tunnelled    inside `firma run`: CONNECT through the proxy, the agent's TLS end to end with the
               upstream (SNI checked, bytes relayed)
  inspected    inside `firma run --inspect`: CONNECT through the proxy, the agent's TLS terminated
               with a leaf of firma's CA, each request decided, relayed over TLS verified against
               the test CA

Measured per row: the TLS handshake of a fresh connection (TCP connect, the CONNECT exchange, the
handshake; median of connections 2..N, the first one reported alone: it mints the leaf), small
GETs on one kept-alive connection (p50, p95), and a 256 MiB download (median MiB/s). The client
checks who signed the certificate it got (firma's CA when inspected, the test CA otherwise), so
each row measures what it says. The upstream is a TLS server on host loopback serving from memory;
names resolve through an injected resolver (never real DNS)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading

import trustme

CLIENT = r'''
import json, os, socket, ssl, sys, time
mode, host, port, cafile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or os.environ["SSL_CERT_FILE"]
n_hs, n_small, rounds = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])

def connect():
    if mode == "direct":
        s = socket.create_connection(("127.0.0.1", port))
    else:
        s = socket.create_connection(("127.0.0.1", 18080))
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("proxy closed")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit("CONNECT refused: " + head.decode(errors="replace"))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=host)

def issuer(t):
    return " ".join(v for rdn in t.getpeercert()["issuer"] for k, v in rdn)

def get(t, path, buf):
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = t.recv(65536)
        if not chunk:
            raise SystemExit("closed before the response head")
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit("status: " + head.split(b"\r\n")[0].decode())
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
    got = len(rest)
    while got < length:
        k = t.recv_into(buf)
        if not k:
            raise SystemExit("closed mid-body")
        got += k
    return got

hs = []
for _ in range(n_hs):
    t0 = time.perf_counter(); t = connect(); hs.append(time.perf_counter() - t0)
    who = issuer(t); t.close()
buf = bytearray(1 << 20)
t = connect()
small = []
for _ in range(n_small):
    t0 = time.perf_counter(); get(t, "/small", buf); small.append(time.perf_counter() - t0)
t.close()
big = []
for _ in range(rounds):
    t = connect()
    t0 = time.perf_counter(); size = get(t, "/big", buf); big.append((size, time.perf_counter() - t0))
    t.close()
print(json.dumps({"handshakes": hs, "small": small, "big": big, "issuer": who}))
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

NAMES = ("api.example.test", "plain.example.test")


class TlsUpstream:
    """HTTPS/1.1 from memory with keep-alive: /big is `size` bytes, anything else 100 bytes."""

    def __init__(self, ca: trustme.CA, size: int) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*NAMES).configure_cert(self.ctx)
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

    def _one(self, raw: socket.socket) -> None:
        try:
            c = self.ctx.wrap_socket(raw, server_side=True)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, data = data.split(b"\r\n\r\n", 1)
                path = head.split(b" ", 2)[1]
                body = self.big if path == b"/big" else memoryview(b"x" * 100)
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
                for i in range(0, len(body), 4 << 20):
                    c.sendall(body[i:i + (4 << 20)])
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()


def run_client(prefix: list[str], mode: str, host: str, port: int, cafile: str, args, cwd: str, env: dict) -> dict:
    p = subprocess.run([*prefix, "/usr/bin/python3", "client.py", mode, host, str(port), cafile, str(args.handshakes),
                        str(args.small), str(args.rounds)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{mode} {host}: failed: {p.stderr[-1200:]}{p.stdout[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--handshakes", type=int, default=50, help="fresh connections per row")
    ap.add_argument("--small", type=int, default=200, help="small GETs on one connection per row")
    ap.add_argument("--rounds", type=int, default=3, help="large downloads per row (median)")
    args = ap.parse_args()
    ca = trustme.CA()
    up = TlsUpstream(ca, args.size_mib << 20)
    ws = tempfile.mkdtemp(prefix="firma-bench-inspect-")
    state = tempfile.mkdtemp(prefix="firma-bench-inspect-state-")
    cafile = os.path.join(state, "test-ca.pem")  # firma's own trust for the upstream leg (outside the sandbox)
    ca.cert_pem.write_to_path(cafile)
    with open(os.path.join(ws, "client.py"), "w") as f:
        f.write(CLIENT)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "FIRMA_STATE_DIR": state, "SSL_CERT_FILE": cafile,
           "BENCH_RESOLVE": json.dumps({n: ["127.0.0.1"] for n in NAMES})}
    allow = [a for n in NAMES for a in ("--allow-host", f"{n}:{up.port}")]
    firma = [sys.executable, "-c", DRIVER, "run", "--quiet", "--inspect", NAMES[0], *allow, "--"]
    rows = [
        ("direct", [], "direct", NAMES[0], cafile, "trustme"),
        ("tunnelled", firma, "proxy", NAMES[1], "", "trustme"),
        ("inspected", firma, "proxy", NAMES[0], "", "firma"),
    ]
    results = {}
    for name, prefix, mode, host, trust, signer in rows:
        r = run_client(prefix, mode, host, up.port, trust, args, ws, env)
        if signer not in r["issuer"]:
            raise SystemExit(f"{name}: the certificate was issued by {r['issuer']!r}, not {signer}'s CA")
        if any(size != args.size_mib << 20 for size, _ in r["big"]):
            raise SystemExit(f"{name}: a download was cut short")
        results[name] = {
            "first_ms": r["handshakes"][0] * 1000,
            "hs_ms": statistics.median(r["handshakes"][1:]) * 1000,
            "p50_ms": statistics.median(r["small"]) * 1000,
            "p95_ms": statistics.quantiles(r["small"], n=20)[-1] * 1000,
            "mib_s": statistics.median(args.size_mib / t for _, t in r["big"]),
        }
    d, tun, ins = results["direct"], results["tunnelled"], results["inspected"]
    print(f"HTTPS inspection benchmark: {args.handshakes} fresh connections, {args.small} small GETs on one "
          f"connection, {args.size_mib} MiB download (median of {args.rounds}); uid={os.getuid()}, {os.cpu_count()} CPUs")
    hdr = (f"{'path':<11} {'handshake p50 ms':>17} {'+ direct':>9} {'first ms':>9} {'GET p50 ms':>11} {'GET p95 ms':>11} "
           f"{'MiB/s':>7} {'× direct':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name, v in results.items():
        print(f"{name:<11} {v['hs_ms']:17.2f} {v['hs_ms'] - d['hs_ms']:9.2f} {v['first_ms']:9.2f} {v['p50_ms']:11.2f} "
              f"{v['p95_ms']:11.2f} {v['mib_s']:7.0f} {v['mib_s'] / d['mib_s']:9.2f}")
    added = ins["hs_ms"] - d["hs_ms"]
    ratio = ins["mib_s"] / d["mib_s"]
    print(f"goal: inspected handshake ≤ direct + 5 ms after the first: {added:+.2f} ms "
          f"({'met' if added <= 5 else 'not met'}); over the tunnel: {ins['hs_ms'] - tun['hs_ms']:+.2f} ms")
    print(f"goal: inspected 256 MiB download ≥ 0.50 × direct: {ratio:.2f} × ({'met' if ratio >= 0.5 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

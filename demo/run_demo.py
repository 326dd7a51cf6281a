"""`make demo`: what firma does, shown with real traffic on this machine (loopback only).

Starts a local upstream (stand-in for an allowed API) and a host service (stand-in for a local
database) on host loopback, runs demo/agent.py under `firma run`, and prints what the agent got
and what actually reached the far side. Every verdict is computed from those observations."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Upstream:
    def __init__(self) -> None:
        self.requests: list[str] = []
        up = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                up.requests.append(self.path)
                body = b"hello from upstream"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class HostService:
    def __init__(self) -> None:
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            c.close()


def short(detail: str) -> str:
    d = str(detail)
    if "Connection refused" in d or "Errno 111" in d:
        return "connection refused"
    if "name resolution" in d or "gaierror" in d:
        return "no address (name resolution failed)"
    return d


def audit_events(path: Path, sandbox_id: str) -> list[dict]:
    """Decisions the sidecar signed for this sandbox (empty when there is no audit log)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("sandbox_id") == sandbox_id:
            out.append(e)
    return out


def main() -> int:
    upstream, service = Upstream(), HostService()
    ws = Path(tempfile.mkdtemp(prefix="firma-demo-"))
    shutil.copy(HERE / "agent.py", ws / "agent.py")
    results = ws / "results.json"
    state = Path(tempfile.mkdtemp(prefix="firma-demo-state-"))
    proof = ws / "proof.json"
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
    cmd = [sys.executable, "-m", "firma", "run", "--allow-host", f"127.0.0.1:{upstream.port}",
           "--proof-file", str(proof), "--", python, "agent.py", str(results), str(upstream.port), str(service.port)]
    print("firma demo: an agent tries five ways out of its sandbox (all traffic stays on this machine)")
    print(f"  allowed upstream : http://127.0.0.1:{upstream.port}  (--allow-host 127.0.0.1:{upstream.port})")
    print(f"  host service     : 127.0.0.1:{service.port}  (a local database stand-in; never allowed)")
    print(f"  running          : firma run --allow-host 127.0.0.1:{upstream.port} -- python3 agent.py …\n")
    env = dict(os.environ, FIRMA_STATE_DIR=str(state))
    p = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or not results.exists():
        print(f"firma run failed (exit {p.returncode}):\n{p.stderr}")
        return 1
    r = json.loads(results.read_text())
    doc = json.loads(proof.read_text())

    audit = audit_events(state / "audit.jsonl", doc["sandbox_id"])
    dns_seen = [e for e in audit if "dns" in str(e.get("action", ""))]
    denied_seen = [e for e in audit if e.get("decision") == 2 and "denied.example.com" in str(e.get("resource", ""))]
    allowed_hits = sum(1 for x in upstream.requests if x == "/v1/hello")
    direct_hits = sum(1 for x in upstream.requests if x == "/v1/direct")
    rows = []

    def row(n, what, got, far, ok_when, good, bad):
        rows.append((n, what, got, far, good if ok_when else bad))

    a = r["allowed"]
    row(1, "allowed request via the proxy", a["detail"], f"upstream saw {allowed_hits} request(s)",
        a["ok"] and allowed_hits == 1, "ALLOWED (policy)", "UNEXPECTED")
    d = r["denied"]
    row(2, "request to denied.example.com", f"{d['detail']} reason={d.get('reason')}",
        f"sidecar audit: {len(denied_seen)} deny event(s)" if audit else "no audit log to check",
        d.get("status") == 403 and bool(d.get("reason")) and len(denied_seen) == 1, "DENIED (policy, 403)", "UNEXPECTED")
    t = r["raw_tcp"]
    row(3, f"raw TCP to 127.0.0.1:{service.port}", short(t["detail"]), f"service saw {service.connections} connection(s)",
        not t["ok"] and service.connections == 0, "BLOCKED (no route)", "ESCAPED")
    n = r["dns"]
    row(4, "DNS lookup of example.com", short(n["detail"]) if not n["ok"] else f"addresses {n['detail']}",
        f"stub refused {len(dns_seen)} quer(ies) (audit)" if audit else "no audit log to check",
        not n["ok"] and len(dns_seen) > 0, "BLOCKED (no address)", "ESCAPED")
    u = r["no_proxy"]
    # Transparent egress: a client that ignores the proxy still goes through the sidecar's
    # decision (and audit); it arrives only as an allowed, audited connection.
    tunnels = [e for e in audit if e.get("action") == "network.connect" and e.get("decision") == 1
               and e.get("resource") == f"127.0.0.1:{upstream.port}"]
    row(5, "proxy variables unset, direct GET", short(u["detail"]),
        f"upstream saw {direct_hits}, sidecar allowed {len(tunnels)}",
        u["ok"] and direct_hits == 1 and len(tunnels) == 1, "ALLOWED (sidecar, no proxy)",
        "ESCAPED" if direct_hits > len(tunnels) else "UNEXPECTED")

    headers = ("#", "the agent tried", "what it got inside the sandbox", "what reached the far side", "verdict")
    table = [headers] + [tuple(str(c) for c in x) for x in rows]
    widths = [min(max(len(x[i]) for x in table), 48) for i in range(len(headers))]
    for i, line in enumerate(table):
        print("  " + "  ".join(c[: widths[j]].ljust(widths[j]) for j, c in enumerate(line)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    checks = doc["checks"]
    ok = sum(1 for c in checks if c["ok"])
    print(f"\nproof: {proof}")
    print(f"       (also kept as {state}/proofs/{doc['sandbox_id']}.json; audit log {state}/audit.jsonl)")
    print(f"       backend={doc['backend']} confinement={doc['network_confinement']} enforced={str(doc['enforced']).lower()}"
          f" checks {ok}/{len(checks)} ok: " + ", ".join(c["name"] for c in checks))
    bad = [x for x in rows if x[4] in ("UNEXPECTED", "ESCAPED")]
    if bad:
        print(f"\n{len(bad)} outcome(s) differ from what firma promises: see the rows marked above.")
        return 1
    print("\nEvery way out was closed or went through the sidecar's decision, and the proof says how.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

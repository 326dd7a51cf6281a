"""`make demo`: what firma does, shown with real traffic on this machine (loopback only).

Starts a local upstream (stand-in for an allowed API), an HTTPS upstream (stand-in for an API the
agent holds a token for, and for another site) and a host service (stand-in for a local
database) on host loopback, runs demo/agent.py under `firma run`, and prints what the agent got
and what actually reached the far side. Every verdict is computed from those observations.

The HTTPS names (`*.demo.test`) resolve to 127.0.0.1 through a resolver this demo injects into
firma (there is no real DNS here); firma verifies the upstream against the demo's own test CA,
named by SSL_CERT_FILE in firma's environment."""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
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


class HttpsEcho:
    """HTTPS on 127.0.0.1 for api.demo.test and other.demo.test (a trustme CA): records each
    request's host, path and Authorization header, and echoes the Authorization it got."""

    def __init__(self, ca) -> None:
        self.requests: list[tuple[str, str, str]] = []
        up = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                auth = self.headers.get("authorization", "")
                up.requests.append((self.headers.get("host", "").split(":")[0], self.path, auth))
                body = json.dumps({"you_sent": auth}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *a):
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("api.demo.test", "other.demo.test").configure_cert(ctx)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# firma with a resolver for the demo's names (the sidecar resolves names on the host).
DRIVER = r'''
import sys
import firma.services.sidecar as sc
async def resolve(host, port):
    if host.endswith(".demo.test"):
        return ["127.0.0.1"]
    raise OSError(f"the demo resolves only *.demo.test, not {host}")
sc.system_resolver = resolve
from firma.cli.main import entry
sys.exit(entry())
'''


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
    import trustme

    ca = trustme.CA()
    upstream, service, api = Upstream(), HostService(), HttpsEcho(ca)
    ws = Path(tempfile.mkdtemp(prefix="firma-demo-"))
    shutil.copy(HERE / "agent.py", ws / "agent.py")
    results = ws / "results.json"
    state = Path(tempfile.mkdtemp(prefix="firma-demo-state-"))
    conf = Path(tempfile.mkdtemp(prefix="firma-demo-config-"))  # the user's own config: outside the workspace
    ca.cert_pem.write_to_path(str(conf / "demo-ca.pem"))
    (conf / "firma.toml").write_text(
        "[run]\n"
        'inspect = ["other.demo.test"]\n'
        "[credentials.demo]\n"
        f'hosts = ["api.demo.test:{api.port}"]\n'
        'env = "DEMO_TOKEN"\n'
        'source = "env:FIRMA_DEMO_SECRET"\n')
    secret = "demo-" + secrets.token_hex(12)
    proof = ws / "proof.json"
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
    allow = ["--allow-host", f"127.0.0.1:{upstream.port}", "--allow-host", f"api.demo.test:{api.port}",
             "--allow-host", f"other.demo.test:{api.port}"]
    cmd = [sys.executable, "-c", DRIVER, "run", "--config", str(conf / "firma.toml"), *allow,
           "--proof-file", str(proof), "--", python, "agent.py", str(results), str(upstream.port), str(service.port),
           str(api.port)]
    print("firma demo: an agent tries seven ways out of its sandbox (all traffic stays on this machine)")
    print(f"  allowed upstream : http://127.0.0.1:{upstream.port}  (--allow-host 127.0.0.1:{upstream.port})")
    print(f"  HTTPS upstream   : api.demo.test and other.demo.test on 127.0.0.1:{api.port}, both allowed; the agent")
    print(f"                     holds a token for api.demo.test only ([credentials.demo] in {conf / 'firma.toml'})")
    print(f"  host service     : 127.0.0.1:{service.port}  (a local database stand-in; never allowed)")
    print(f"  running          : firma run --config … {' '.join(allow)} -- python3 agent.py …\n")
    env = dict(os.environ, FIRMA_STATE_DIR=str(state), SSL_CERT_FILE=str(conf / "demo-ca.pem"), FIRMA_DEMO_SECRET=secret)
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

    # HTTPS inspection and credential brokering: the token the agent holds is a placeholder; the
    # real secret reaches only its bound host, and the placeholder sent elsewhere is refused.
    token = r["token_seen"]["detail"] if r["token_seen"]["ok"] else ""
    got_real = [x for x in api.requests if x[0] == "api.demo.test" and x[2] == f"Bearer {secret}"]
    c = r["credential"]
    agent_saw = c["detail"]
    injected = [e for e in audit if "credential_injected:demo" in str(e.get("deny_reason", ""))]
    row(6, "call api.demo.test with $DEMO_TOKEN", f"placeholder {token[:20]}…",
        f"real secret arrived {len(got_real)}x, audit: injected",
        c["ok"] and secret not in agent_saw and token in agent_saw and token.startswith("firma-cred-demo-")
        and secret not in token and len(got_real) == 1 and len(injected) == 1,
        "INJECTED (agent never saw it)", "LEAKED" if secret in agent_saw or secret in token else "UNEXPECTED")
    x = r["exfiltration"]
    other_hits = [q for q in api.requests if q[0] == "other.demo.test"]
    exfil = [e for e in audit if e.get("deny_reason") == "credential_exfiltration:demo"]
    row(7, "POST $DEMO_TOKEN to other.demo.test", f"{x['detail']} reason={x.get('reason')}",
        f"other saw {len(other_hits)} request(s), {len(exfil)} refusal audited",
        x.get("status") == 403 and not other_hits and len(exfil) == 1, "REFUSED (exfiltration)",
        "ESCAPED" if other_hits else "UNEXPECTED")

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

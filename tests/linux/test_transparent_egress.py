"""Transparent egress (DESIGN §5.4), for real: clients that ignore the proxy variables reach an
allowed name through the sidecar, names no rule allows get REFUSED, opaque TCP needs allow_tcp,
unplanted ports are refused at once, UDP goes nowhere; the proof's check matches the sandbox.

Names resolve on the host through the test driver's FIRMA_TEST_RESOLVE table (never real DNS);
every upstream and must-not-connect listener is on host loopback; the only other addresses dialled
are documentation and synthetic ones, inside the sandbox, whose network namespace has only `lo`."""

from __future__ import annotations

import fcntl
import json
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import trustme

from linux_support import SYSTEM_PYTHON, StreamRecorder, UdpRecorder, Upstream, base_env, require_tools, run_firma

pytestmark = pytest.mark.confinement


def _env(tmp_path, **names):
    env = base_env(tmp_path)
    env["FIRMA_TEST_RESOLVE"] = json.dumps({n: ["127.0.0.1"] for n in names} or {"allowed.test": ["127.0.0.1"]})
    return env


def _audit(tmp_path) -> list[dict]:
    with open(tmp_path / "state" / "audit.jsonl") as f:
        return [json.loads(line) for line in f]


def _proof(tmp_path) -> dict:
    (p,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(p.read_text())


# Four kinds of client, none using a proxy variable (the agent's environment is emptied by env -i):
# a socket client by name, curl told to ignore proxies, Node's fetch, and a "Go-style" client that
# resolves first and connects to the address it got.
CLIENTS = r"""
set -u
url="http://$1:$2/"
env -i /usr/bin/python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET /socket HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n" % (sys.argv[1].encode(), sys.argv[2].encode()))
print("socket", b"".join(iter(lambda: s.recv(4096), b""))[:12].decode())' "$1" "$2" 2>&1 | tail -1
echo "curl $(env -i /usr/bin/curl -s --noproxy '*' -m 5 -o /dev/null -w '%{http_code}' "${url}curl")"
env -i /usr/bin/node -e 'fetch(process.argv[1] + "node").then(r => console.log("node", r.status)).catch(e => console.log("node", (e.cause && e.cause.code) || e.message))' "$url"
env -i /usr/bin/python3 -c '
import socket, sys
try:
    infos = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), type=socket.SOCK_STREAM)
except socket.gaierror as e:
    print("resolved", e.errno); sys.exit()
fam, _, _, _, addr = infos[0]
s = socket.socket(fam); s.settimeout(5); s.connect(addr)
s.sendall(b"GET /bytaddr HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n" % (sys.argv[1].encode(), sys.argv[2].encode()))
print("resolved", addr[0], b"".join(iter(lambda: s.recv(4096), b""))[:12].decode())' "$1" "$2"
"""


def test_clients_without_proxy_variables_reach_an_allowed_name(tmp_path, ws):
    require_tools()
    up = Upstream()
    try:
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{up.port}", "--", "sh", "-c", CLIENTS, "x",
                       "allowed.test", str(up.port)], cwd=ws, env=_env(tmp_path))
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == "socket HTTP/1.1 200" and lines[1] == "curl 200" and lines[2] == "node 200", lines
        assert lines[3].startswith("resolved 198.18.") or lines[3].startswith("resolved fd66:6972:6d61::"), lines
        assert lines[3].endswith("HTTP/1.1 200"), lines
        # what reached the far side: each client's own request, through the sidecar
        assert sorted(h.decode() for h in up.hits) == ["GET /bytaddr", "GET /curl", "GET /node", "GET /socket"]
        decided = [e for e in _audit(tmp_path) if e["action"] == "http.request"]
        assert len(decided) == 4 and all(e["decision"] == 1 for e in decided)
        assert all(e["sandbox_id"] == _proof(tmp_path)["sandbox_id"] for e in decided)  # attributed
    finally:
        up.close()


def test_a_name_no_rule_allows_is_refused_at_dns_and_nothing_arrives(tmp_path, ws):
    require_tools()
    up = Upstream()
    try:
        # the same clients, for a name the test resolver knows but no rule allows (the previous
        # test is the control: allowed, the same clients reach the upstream)
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{up.port}", "--", "sh", "-c", CLIENTS, "x",
                       "denied.test", str(up.port)], cwd=ws, env=_env(tmp_path, **{"allowed.test": 1, "denied.test": 1}))
        assert p.returncode == 0, p.stderr
        out = p.stdout
        assert "socket HTTP" not in out and "curl 000" in out and "node EAI_AGAIN" in out and "resolved -3" in out, out
        assert up.hits == []
        refused = [e for e in _audit(tmp_path) if e["action"] == "dns.query" and e["resource"].startswith("denied.test")]
        assert refused and all(e["decision"] == 2 and e["deny_reason"] == "dns_refused" for e in refused)
    finally:
        up.close()


def test_a_denied_ip_literal_is_refused_and_audited(tmp_path, ws):
    """A documentation address dialled inside lands on the planted listener (every address is
    local there), is decided as an IP literal, refused and audited; nothing is dialled."""
    require_tools()
    up = Upstream()
    try:
        probe = ("import socket\n"
                 "s = socket.create_connection(('198.51.100.7', 80), timeout=5)\n"
                 "s.sendall(b'GET / HTTP/1.1\\r\\nHost: 198.51.100.7\\r\\n\\r\\n')\n"
                 "try:\n"
                 "    print(repr(s.recv(20)))\n"
                 "except ConnectionResetError:\n"
                 "    print('reset')\n")
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{up.port}", "--", SYSTEM_PYTHON, "-c", probe],
                      cwd=ws, env=_env(tmp_path))
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() in ("b''", "reset"), p.stdout  # closed without an answer
        refused = [e for e in _audit(tmp_path) if e["resource"] == "198.51.100.7:80"]
        assert [(e["action"], e["decision"], e["deny_reason"]) for e in refused] == [("network.connect", 2, "host_not_allowed")]
        assert up.hits == []
    finally:
        up.close()


def _banner_server():
    """A server-speaks-first stand-in for sshd on host loopback: sends a banner, records what
    the client sends back."""
    rec: list[bytes] = []
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"SSH-2.0-firmatest\r\n")
            c.settimeout(3)
            try:
                rec.append(c.recv(100))
            except OSError:
                rec.append(b"")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, rec


def test_ssh_to_a_name_works_only_with_allow_tcp(tmp_path, ws):
    require_tools()
    srv, rec = _banner_server()
    port = srv.getsockname()[1]
    ssh = (f"timeout 8 ssh -p {port} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
           "-o ConnectTimeout=5 git@allowed.test true; echo rc=$?")
    try:
        env = _env(tmp_path)
        # allowed as HTTP(S) only: the name resolves, but ssh is neither TLS nor HTTP
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{port}", "--", "sh", "-c", ssh], cwd=ws, env=env)
        assert p.returncode == 0 and "rc=255" in p.stdout, (p.stdout, p.stderr)
        assert rec == []  # nothing arrived
        events = [e for e in _audit(tmp_path) if e["resource"] == f"allowed.test:{port}"]
        assert events and events[-1]["deny_reason"] in ("tls_or_http_required",), events
        p = run_firma(["run", "--quiet", "--allow-tcp", f"allowed.test:{port}", "--", "sh", "-c", ssh], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert rec and rec[0].startswith(b"SSH-2.0-OpenSSH"), rec  # the real ssh client's banner arrived
        opaque = [e for e in _audit(tmp_path) if e["resource"] == f"allowed.test:{port}" and e["decision"] == 1]
        assert opaque and opaque[-1]["deny_reason"] in ("opaque_tcp", "shutdown", "client_closed"), opaque
    finally:
        srv.close()


def test_unplanted_ports_refuse_at_once_and_udp_goes_nowhere(tmp_path, ws):
    """A port no rule names has no listener: refused immediately, on any address. UDP (other than
    the DNS stub) reaches nothing: judged at a UDP listener on host loopback, not by exit codes,
    since every address is local inside. The routes and listeners inside match the proof."""
    require_tools()
    up = Upstream()
    udp = UdpRecorder()
    tcp = StreamRecorder(socket.AF_INET, ("127.0.0.1", 0))
    try:
        probe = (
            "import json, socket, time\n"
            "out = {}\n"
            f"for addr in ('198.51.100.7', '2001:db8::7', '127.0.0.1', 'allowed.test'):\n"
            "    t = time.monotonic()\n"
            "    try:\n"
            f"        socket.create_connection((addr, {tcp.addr[1]}), timeout=5).close(); out[addr] = 'connected'\n"
            "    except OSError as e:\n"
            "        out[addr] = [type(e).__name__, round(time.monotonic() - t, 2)]\n"
            "for addr in ('127.0.0.1', '198.51.100.7'):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'leak', (addr, {udp.port}))\n"
            "out['fib'] = open('/proc/net/fib_trie').read()\n"
            "out['tcp'] = open('/proc/net/tcp').read()\n"
            "print(json.dumps(out))\n"
        )
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{up.port}", "--", SYSTEM_PYTHON, "-c", probe],
                      cwd=ws, env=_env(tmp_path))
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        for addr in ("198.51.100.7", "2001:db8::7", "127.0.0.1", "allowed.test"):
            kind, secs = out[addr]
            assert kind == "ConnectionRefusedError" and secs < 1, (addr, out[addr])
        time.sleep(0.3)
        assert udp.hits == [] and tcp.hits == []
        # controls: from outside both listeners receive
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"control", ("127.0.0.1", udp.port))
        socket.create_connection(tcp.addr, timeout=5).close()
        deadline = time.monotonic() + 5
        while (not udp.hits or not tcp.hits) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert udp.hits == [b"control"] and tcp.hits
        check = {c["name"]: c for c in _proof(tmp_path)["checks"]}["transparent_egress"]
        assert check["ok"] and "local 0.0.0.0/0 dev lo: present" in check["detail"]
        assert f"listening on every address: 80, 443, {up.port}" in check["detail"], check
        assert "|-- 0.0.0.0\n" in out["fib"].split("Local:")[1] and "/0 host LOCAL" in out["fib"].split("Local:")[1]
        listening = {line.split()[1] for line in out["tcp"].splitlines()[1:] if line.split()[3] == "0A"}
        assert {f"00000000:{p:04X}" for p in (80, 443, up.port)} <= listening
    finally:
        up.close()
        udp.close()
        tcp.close()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class TlsUpstream:
    """HTTPS on host loopback with a certificate for allowed.test; records request lines."""

    def __init__(self, ca) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("allowed.test").configure_cert(ctx)
        self.hits: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.ctx = ctx
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                t = self.ctx.wrap_socket(c, server_side=True)
                t.settimeout(5)
                line = t.recv(4096).split(b"\r\n", 1)[0].decode()
                self.hits.append(line)
                t.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                t.close()
            except (OSError, ssl.SSLError):
                c.close()

    def close(self) -> None:
        self.sock.close()


def test_tls_to_an_allowed_name_passes_and_a_foreign_sni_does_not(tmp_path, ws, ca):
    require_tools()
    up = TlsUpstream(ca)
    cafile = ws / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    script = (
        f"getent hosts allowed.test >/dev/null; "
        f"echo ok $(curl -s --noproxy '*' --cacert ca.pem -m 5 -o /dev/null -w '%{{http_code}}' https://allowed.test:{up.port}/tls); "
        # allowed.test's synthetic address, with another name in the SNI (domain fronting)
        "addr=$(python3 -c 'import socket; print(socket.getaddrinfo(\"allowed.test\", 443, socket.AF_INET)[0][4][0])'); "
        f"echo fronted $(curl -s --noproxy '*' -k -m 5 -o /dev/null -w '%{{http_code}}' --resolve other.test:{up.port}:$addr "
        f"https://other.test:{up.port}/fronted)"
    )
    try:
        p = run_firma(["run", "--quiet", "--allow-host", f"allowed.test:{up.port}", "--", "sh", "-c", script],
                      cwd=ws, env=_env(tmp_path))
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == ["ok 200", "fronted 000"], p.stdout
        assert up.hits == ["GET /tls HTTP/1.1"]  # the fronted request never reached it
        reasons = [e["deny_reason"] for e in _audit(tmp_path) if e["resource"] == f"allowed.test:{up.port}" and e["decision"] == 2]
        assert reasons == ["sni_mismatch"], reasons
    finally:
        up.close()


@pytest.mark.unprivileged
def test_unprivileged_caller_gets_the_same_routes_and_listeners(tmp_path):
    """As an unprivileged user the planting helper holds CAP_NET_ADMIN only over the sandbox's
    own namespace: the local routes and listeners are planted there too, and a client that
    ignores the proxy reaches the allowed upstream through the sidecar (audited)."""
    import os

    from linux_support import HERE
    from unprivileged_support import PY, make_install, remove_install

    require_tools()
    inst = make_install("firma-transparent-", extra_tree=HERE)
    up = Upstream()
    try:
        ws = inst.root / "ws"
        ws.mkdir()
        os.chown(ws, inst.user.pw_uid, inst.user.pw_gid)
        drive = str(inst.root / "tests" / "linux_drive.py")
        script = f"env -i /usr/bin/curl -s --noproxy '*' -m 5 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{up.port}/unpriv"
        p = subprocess.run(inst.argv(PY, drive, "run", "--quiet", "--allow-host", f"127.0.0.1:{up.port}", "--proof-file",
                                     str(ws / "proof.json"), "--", "sh", "-c", script),
                           cwd=ws, env=inst.env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout == "200" and up.hits == [b"GET /unpriv"]
        doc = json.loads((ws / "proof.json").read_text())
        check = {c["name"]: c for c in doc["checks"]}["transparent_egress"]
        assert check["ok"] and f"listening on every address: 80, 443, {up.port}" in check["detail"]
    finally:
        up.close()
        remove_install(inst)


def test_local_routes_wait_for_lo_to_come_up():
    """The `lo` race (bwrap gives lo its address before the link is up): adding the local routes
    answers ENETDOWN until the link is up, and planting waits for it (bounded). In a throwaway
    user and network namespace of a forked child: lo brought up 0.3 s late, the routes land;
    control: lo never brought up, the wait ends with ENETDOWN."""
    import ctypes
    import json as _json
    import os

    from firma.backends.bwrap import planting
    from firma.core import egress

    def child(bring_up: bool) -> dict:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the probe child
            out = {}
            try:
                os.close(r)
                if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "unshare")
                planting._LOOPBACK_WAIT = 1.0

                def up():
                    time.sleep(0.3)
                    with socket.socket() as s:
                        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
                        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))

                if bring_up:
                    threading.Thread(target=up, daemon=True).start()
                t = time.monotonic()
                why = planting.add_local_routes(v6=os.path.exists("/proc/sys/net/ipv6"))
                out = {"why": why.decode(), "secs": time.monotonic() - t,
                       "v4": egress.local_default_routes(open("/proc/self/net/fib_trie").read(), "")[0]}
            except BaseException as exc:
                out = {"error": repr(exc)}
            os.write(w, _json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return _json.loads(data)

    late = child(True)
    assert late.get("why") == "" and late["v4"] and 0.25 < late["secs"] < 1.0, late
    never = child(False)
    assert "Network is down" in never.get("why", ""), never

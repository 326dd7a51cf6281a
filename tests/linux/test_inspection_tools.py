"""HTTPS inspection with real tools (DESIGN §5.7): git over smart HTTP, pip from a package index,
Node's fetch through transparent egress and the JDK's HttpClient each talk to firma's leaf with
no per-tool trust flag (the variables firma sets are enough), their requests are decided and
audited with their paths, and what reached the upstream is checked there.

Every upstream is an HTTPS server on host loopback (certificates from trustme) that records what
arrived; names resolve through the test driver's FIRMA_TEST_RESOLVE table, never real DNS."""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import trustme

from linux_support import SYSTEM_PYTHON, base_env, require_tools, run_firma
from tls_upstream import ca_bundle

pytestmark = pytest.mark.confinement

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
GIT = "/usr/bin/git"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


def _need(*paths: str) -> None:
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"these tests need {', '.join(missing)}; run scripts/install-system-deps.sh")


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


def _ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    return ws


class _Https:
    """A threaded HTTPS server on 127.0.0.1 with a trustme certificate for `name`, speaking
    HTTP/1.1 (kept alive, as firma's relay keeps its upstream connection); `handle(handler,
    body)` answers (status, headers, body). Every request is recorded as (method, path) in
    `hits`, in arrival order."""

    def __init__(self, ca: trustme.CA, name: str, handle) -> None:
        self.hits: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        outer = self
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                body = self._body()
                with outer.lock:
                    outer.hits.append((self.command, self.path))
                status, headers, out = handle(self, body)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            do_GET = do_POST = do_HEAD = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- git over smart HTTP -------------------------------------------------------------------------

def _git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run([GIT, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=30).stdout


def _git_env(home: Path) -> dict[str, str]:
    """Host-side git, isolated from the caller's configuration."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test"}


class GitServer(_Https):
    """`git http-backend` (CGI) behind a TLS front: a bare repository `repo.git` with one commit
    on main (README.md), push enabled (http.receivepack). Request bodies go to the CGI as they
    came (git inflates a gzip'd body itself, told by HTTP_CONTENT_ENCODING)."""

    def __init__(self, ca: trustme.CA, name: str, root: Path) -> None:
        root.mkdir()
        home = root / "home"
        home.mkdir()
        env = _git_env(home)
        self.root, self.genv = root / "projects", env
        self.encodings: list[tuple[str, str, str]] = []  # (method, path, Content-Encoding)
        bare = self.root / "repo.git"
        _git("init", "-q", "--bare", "-b", "main", str(bare), env=env)
        _git("config", "http.receivepack", "true", cwd=bare, env=env)
        work = root / "seed"
        _git("init", "-q", "-b", "main", str(work), env=env)
        (work / "README.md").write_text("hello from the firma test repository\n")
        _git("add", "README.md", cwd=work, env=env)
        _git("commit", "-q", "-m", "seed", cwd=work, env=env)
        _git("push", "-q", str(bare), "main", cwd=work, env=env)
        super().__init__(ca, name, self._cgi)

    def _cgi(self, h: BaseHTTPRequestHandler, body: bytes):
        path, _, query = h.path.partition("?")
        with self.lock:
            self.encodings.append((h.command, h.path, h.headers.get("content-encoding", "")))
        env = dict(self.genv)
        env.update({
            "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": h.command, "PATH_INFO": unquote(path), "QUERY_STRING": query,
            "CONTENT_TYPE": h.headers.get("content-type", ""), "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1", "REMOTE_USER": "tester",
        })
        for k, v in h.headers.items():
            if k.lower() not in ("content-type", "content-length", "transfer-encoding"):
                env["HTTP_" + k.upper().replace("-", "_")] = v
        p = subprocess.run([GIT, "http-backend"], input=body, env=env, capture_output=True, timeout=30)
        head, _, out = p.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        return status, headers, out

    def refs(self) -> str:
        return _git("for-each-ref", "--format=%(refname)", cwd=self.root / "repo.git", env=self.genv)


AGENT = "git -c user.name=agent -c user.email=agent@example.test"


def _git_script(url: str) -> str:
    """Clone with no git option at all (trust and proxy come from firma), then commit and push a
    branch; each step's status lands in a file of the workspace."""
    return (f"git clone -q '{url}' clone > clone.out 2>&1; echo $? > clone.rc; "
            f"cd clone && echo pushed > pushed.txt && git add pushed.txt && {AGENT} commit -q -m push && "
            "git push origin HEAD:refs/heads/from-agent > ../push.out 2>&1; echo $? > ../push.rc; true")


def test_git_clone_and_push_over_inspected_https(tmp_path, ca):
    """git clone with no git option through --inspect: the leaf is trusted (GIT_SSL_CAINFO, and
    the bundle firma mounts over the system's) and the files arrive; every smart-HTTP request is
    decided and audited with its path (info/refs, git-upload-pack); the push (this test is the
    control of the fetch-only test below) arrives at the upstream as a POST to git-receive-pack
    and the branch exists there; a fetch whose request body git gzips is relayed as sent."""
    _need(GIT, HTTP_BACKEND)
    name = "git.example.test"
    srv = GitServer(ca, name, tmp_path / "srv")
    try:
        env = _env(tmp_path, ca, name)
        ws = _ws(tmp_path)
        base = f"https://{name}:{srv.port}/repo.git"
        # a second clone made before the push fetches it with 60 commits of its own: its haves
        # make a request body over 1 KiB, which git sends gzip'd
        script = (f"git clone -q '{base}' other > other.out 2>&1 && " + _git_script(base) + "; cd ../other && "
                  f"for i in $(seq 60); do {AGENT} commit -q --allow-empty -m other$i || exit; done && "
                  "git fetch -q origin > ../fetch.out 2>&1; echo $? > ../fetch.rc; git rev-parse origin/from-agent > ../fetched")
        p = run_firma(["run", "--quiet", "--inspect", name, "--allow-host", f"{name}:{srv.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "clone.rc").read_text().strip() == "0", (ws / "clone.out").read_text()
        assert (ws / "clone" / "README.md").read_text() == "hello from the firma test repository\n"
        assert (ws / "push.rc").read_text().strip() == "0", (ws / "push.out").read_text()
        assert "refs/heads/from-agent" in srv.refs()
        assert (ws / "fetch.rc").read_text().strip() == "0", (ws / "fetch.out").read_text()
        assert (ws / "fetched").read_text().strip() == _git("rev-parse", "from-agent", cwd=srv.root / "repo.git", env=srv.genv).strip()
        assert ("POST", "/repo.git/git-upload-pack", "gzip") in srv.encodings  # relayed as sent
        arrived = [(m, path.partition("?")[0]) for m, path in srv.hits]
        assert ("GET", "/repo.git/info/refs") in arrived and ("POST", "/repo.git/git-upload-pack") in arrived
        assert ("POST", "/repo.git/git-receive-pack") in arrived
        assert ("GET", "/repo.git/info/refs?service=git-receive-pack") in srv.hits
        events = [e for e in _audit(tmp_path) if e["action"] == "http.request"]
        resources = {e["resource"] for e in events if e["decision"] == 1}
        for want in (f"GET {base}/info/refs", f"POST {base}/git-upload-pack", f"POST {base}/git-receive-pack"):
            assert want in resources, (want, resources)
        assert not any("service=" in e["resource"] for e in events)  # query values never in the audit
    finally:
        srv.close()


def test_the_documented_git_fetch_only_policy_refuses_push(tmp_path, ca):
    """examples/policies/git-fetch-only.cedar as the README shows it, with a local stand-in for
    github.com: the clone works (no --inspect: the policy's path rule makes the host inspected),
    `git push` fails with the 403, the upstream never received a POST to git-receive-pack and
    has no new branch; the refusal is audited as policy_forbid. Control: the test above (the
    same push without the policy arrives)."""
    _need(GIT, HTTP_BACKEND)
    name = "github.com"
    srv = GitServer(ca, name, tmp_path / "srv")
    try:
        env = _env(tmp_path, ca, name)
        ws = _ws(tmp_path)
        base = f"https://{name}:{srv.port}/repo.git"
        p = run_firma(["run", "--quiet", "--policy", str(EXAMPLES / "git-fetch-only.cedar"),
                       "--allow-host", f"{name}:{srv.port}", "--", "sh", "-c", _git_script(base)],
                      cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "clone.rc").read_text().strip() == "0", (ws / "clone.out").read_text()
        assert (ws / "clone" / "README.md").exists()
        said = (ws / "push.out").read_text()
        assert (ws / "push.rc").read_text().strip() != "0", said
        assert "RPC failed; HTTP 403" in said, said
        assert ("POST", "/repo.git/git-upload-pack") in srv.hits  # the fetch went through
        assert not [h for h in srv.hits if h[0] == "POST" and h[1].startswith("/repo.git/git-receive-pack")], srv.hits
        assert "from-agent" not in srv.refs()
        denied = [e for e in _audit(tmp_path) if e["decision"] == 2 and e["action"] == "http.request"]
        assert [(e["resource"], e["deny_reason"]) for e in denied] == [(f"POST {base}/git-receive-pack", "policy_forbid")]
    finally:
        srv.close()


# --- pip from a package index --------------------------------------------------------------------

WHEEL = "firmademo-1.0-py3-none-any.whl"


def _wheel() -> bytes:
    """A tiny, valid pure-Python wheel (pip download checks only its name and that it is a zip)."""
    buf = io.BytesIO()
    files = {
        "firmademo/__init__.py": "X = 1\n",
        "firmademo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: firmademo\nVersion: 1.0\n",
        "firmademo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: firma-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("firmademo-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "firmademo-1.0.dist-info/RECORD,,\n")
    return buf.getvalue()


class PackageIndex(_Https):
    """A PEP 503 simple index for one project, firmademo, with one wheel."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        self.wheel = _wheel()
        super().__init__(ca, name, self._answer)

    def _answer(self, h: BaseHTTPRequestHandler, body: bytes):
        if h.path == "/simple/firmademo/":
            page = f'<!DOCTYPE html><html><body><a href="/files/{WHEEL}">{WHEEL}</a></body></html>'
            return 200, [("content-type", "text/html")], page.encode()
        if h.path == f"/files/{WHEEL}":
            return 200, [("content-type", "application/octet-stream")], self.wheel
        return 404, [("content-type", "text/plain")], b"not here\n"


def test_pip_downloads_from_an_inspected_index_with_no_trust_flag(tmp_path, ca):
    """pip download (the system pip) from an HTTPS index through --inspect: trust (PIP_CERT; Debian's
    pip also reads the system bundle firma mounts) and the proxy come from firma, no --cert or
    --trusted-host; the wheel lands in the workspace
    byte for byte, the index saw the project page and the wheel, and the audit lists both as
    inspected https requests."""
    name = "pypi.example.test"
    index = PackageIndex(ca, name)
    try:
        env = _env(tmp_path, ca, name)
        ws = _ws(tmp_path)
        url = f"https://{name}:{index.port}"
        # not trust flags: no config file of the host's, no self-check, no cache (HOME is not the test's)
        script = (f"PIP_CONFIG_FILE=/dev/null {SYSTEM_PYTHON} -m pip download --disable-pip-version-check --no-cache-dir "
                  f"--no-deps --index-url {url}/simple/ -d dl firmademo > pip.out 2>&1; echo $? > pip.rc")
        p = run_firma(["run", "--quiet", "--inspect", name, "--allow-host", f"{name}:{index.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "pip.rc").read_text().strip() == "0", (ws / "pip.out").read_text()
        assert (ws / "dl" / WHEEL).read_bytes() == index.wheel
        assert index.hits == [("GET", "/simple/firmademo/"), ("GET", f"/files/{WHEEL}")]
        allowed = [e["resource"] for e in _audit(tmp_path) if e["action"] == "http.request" and e["decision"] == 1]
        assert allowed == [f"GET {url}/simple/firmademo/", f"GET {url}/files/{WHEEL}"], allowed
    finally:
        index.close()


# --- Node's fetch, through transparent egress ----------------------------------------------------

class EchoServer(_Https):
    def __init__(self, ca: trustme.CA, name: str) -> None:
        super().__init__(ca, name, lambda h, body: (200, [("content-type", "text/plain")], f"echo {h.command} {h.path}".encode()))


def test_node_fetch_reaches_an_inspected_host_through_transparent_egress(tmp_path, ca):
    """Node's fetch ignores the proxy variables (Node < 24): it resolves the name through the
    sandbox's DNS stub and connects to the synthetic address, where firma's planted listener
    takes the TLS, terminates it with a leaf of firma's CA, and decides the request by its path.
    With no flag Node trusts that leaf (NODE_EXTRA_CA_CERTS; Debian's build also reads
    SSL_CERT_FILE and the system bundle firma mounts); with --use-bundled-ca and SSL_CERT_FILE
    unset, NODE_EXTRA_CA_CERTS alone carries the trust. Control: with --use-bundled-ca and
    NODE_EXTRA_CA_CERTS unset, Node refuses the leaf and nothing of it reaches the upstream."""
    _need("/usr/bin/node")
    name = "api.example.test"
    up = EchoServer(ca, name)
    try:
        env = _env(tmp_path, ca, name)
        ws = _ws(tmp_path)
        url = f"https://{name}:{up.port}"
        js = ("fetch(process.argv[1]).then(r => r.text().then(t => console.log(r.status, t)))"
              ".catch(e => console.log('failed', (e.cause && e.cause.code) || e.message))")
        script = (f"node -e \"$1\" '{url}/x' > node.out 2> node.err; "
                  f"env -u SSL_CERT_FILE node --use-bundled-ca -e \"$1\" '{url}/extra' > extra.out 2> extra.err; "
                  f"env -u NODE_EXTRA_CA_CERTS node --use-bundled-ca -e \"$1\" '{url}/untrusted' > untrusted.out 2>&1; true")
        p = run_firma(["run", "--quiet", "--inspect", name, "--allow-host", f"{name}:{up.port}",
                       "--", "sh", "-c", script, "sh", js], cwd=ws, env=env)
        assert p.returncode == 0, p.stderr
        assert (ws / "node.out").read_text().strip() == "200 echo GET /x", (ws / "node.err").read_text()
        assert (ws / "extra.out").read_text().strip() == "200 echo GET /extra", (ws / "extra.err").read_text()
        untrusted = (ws / "untrusted.out").read_text().strip()
        assert untrusted in ("failed SELF_SIGNED_CERT_IN_CHAIN", "failed UNABLE_TO_VERIFY_LEAF_SIGNATURE",
                             "failed UNABLE_TO_GET_ISSUER_CERT_LOCALLY"), untrusted  # control
        assert up.hits == [("GET", "/x"), ("GET", "/extra")]
        events = _audit(tmp_path)
        # Node resolved the name itself (a proxy client would not): the DNS stub answered it
        assert [e for e in events if e["action"] == "dns.query" and e["resource"] == f"{name} A" and e["decision"] == 1]
        for path in ("/x", "/extra"):
            inspected = [(e["action"], e["decision"]) for e in events if e["resource"] == f"GET {url}{path}"]
            assert inspected == [("http.request", 1)], (path, events)
        refused = [(e["action"], e["decision"], e["deny_reason"]) for e in events if e["resource"] == f"{name}:{up.port}"]
        assert refused == [("network.connect", 2, "agent_tls_failed")], refused
        assert not [e for e in events if "/untrusted" in e["resource"]]
    finally:
        up.close()


# --- the JDK's HttpClient ------------------------------------------------------------------------

HELLO_JAVA = """
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Hello {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.getDefault()).build();
        for (String url : args) {
            try {
                HttpResponse<String> r = client.send(HttpRequest.newBuilder(URI.create(url)).build(),
                                                     HttpResponse.BodyHandlers.ofString());
                System.out.println(r.statusCode() + " " + r.version() + " " + r.body());
            } catch (Exception e) {
                Throwable t = e;
                while (t.getCause() != null) t = t.getCause();
                System.out.println("failed " + t.getClass().getName() + ": " + t.getMessage());
            }
        }
    }
}
"""


def test_java_httpclient_trusts_firmas_truststore_from_java_tool_options(tmp_path, ca):
    """A single-file Java program (`java Hello.java`) with java.net.http.HttpClient and the
    default ProxySelector (the program's own choice: HttpClient uses no proxy unless told to);
    the proxy properties and the PKCS12 trust store both come from firma's JAVA_TOOL_OPTIONS,
    nothing on the command line. The request is inspected (audited with its path, arrived at the
    upstream); HTTP/2, which firma does not offer, is negotiated down to HTTP/1.1. Control: with
    JAVA_TOOL_OPTIONS holding only the proxy properties (no trust store), the JDK refuses firma's
    leaf and nothing arrives."""
    _need("/usr/bin/java", "/usr/bin/javac")  # `java Hello.java` compiles: a JDK, not only a JRE
    name = "api.example.test"
    up = EchoServer(ca, name)
    try:
        env = _env(tmp_path, ca, name)
        ws = _ws(tmp_path)
        (ws / "Hello.java").write_text(HELLO_JAVA)
        url = f"https://{name}:{up.port}"
        script = (f"java Hello.java '{url}/java' > java.out 2> java.err; "
                  # the control: firma's JAVA_TOOL_OPTIONS without the trust store property
                  "JAVA_TOOL_OPTIONS=$(printf '%s' \"$JAVA_TOOL_OPTIONS\" | tr ' ' '\\n' | grep -v trustStore | tr '\\n' ' ') "
                  f"java Hello.java '{url}/untrusted' > untrusted.out 2> untrusted.err; "
                  "printf '%s' \"$JAVA_TOOL_OPTIONS\" > jto.out; true")
        p = run_firma(["run", "--quiet", "--inspect", name, "--allow-host", f"{name}:{up.port}",
                       "--", "sh", "-c", script], cwd=ws, env=env, timeout=90)
        assert p.returncode == 0, p.stderr
        jto = (ws / "jto.out").read_text()
        assert "-Djavax.net.ssl.trustStore=/run/firma/ca-truststore.p12" in jto and "-Dhttps.proxyHost=" in jto, jto
        assert (ws / "java.out").read_text().strip() == "200 HTTP_1_1 echo GET /java", (ws / "java.out").read_text() + (ws / "java.err").read_text()
        untrusted = (ws / "untrusted.out").read_text()
        assert untrusted.startswith("failed ") and "unable to find valid certification path" in untrusted, untrusted
        assert up.hits == [("GET", "/java")]
        events = _audit(tmp_path)
        assert [(e["action"], e["decision"]) for e in events if e["resource"] == f"GET {url}/java"] == [("http.request", 1)]
        refused = [(e["action"], e["decision"], e["deny_reason"]) for e in events if e["resource"] == f"{name}:{up.port}"]
        assert refused == [("network.connect", 2, "agent_tls_failed")], refused  # the control's handshake
        assert not [e for e in events if e["action"] == "dns.query"]  # through the proxy, not resolved inside
    finally:
        up.close()

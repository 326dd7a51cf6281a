"""Tool caches kept between runs (DESIGN §5.6): a pip cache populated by one run is used by the
next (the second download makes no request for the wheel at a local index on host loopback);
without the cache, or after `firma cache clear`, it is fetched again (controls)."""

from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import threading
import zipfile

import pytest

from linux_support import base_env, firma_cmd, require_tools, run_firma

WHEEL = "firmademo-1.0-py3-none-any.whl"


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("firmademo/__init__.py", "X = 1\n")
        z.writestr("firmademo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: firmademo\nVersion: 1.0\n")
        z.writestr("firmademo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("firmademo-1.0.dist-info/RECORD", "")
    return buf.getvalue()


class Index:
    """A package index on host loopback that records the paths asked for."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        wheel, hits = _wheel(), self.hits

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                if self.path.rstrip("/") == "/simple/firmademo":
                    body, ctype = f'<a href="/files/{WHEEL}">{WHEEL}</a>'.encode(), "text/html"
                elif self.path == f"/files/{WHEEL}":
                    body, ctype = wheel, "application/octet-stream"
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "max-age=600")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index():
    i = Index()
    yield i
    i.close()


def _download(index: Index, ws, env, *extra: str):
    script = (f"PIP_CONFIG_FILE=/dev/null PIP_TRUSTED_HOST=127.0.0.1:{index.port} /usr/bin/python3 -m pip download "
              f"--no-deps -q -d /tmp/out --index-url http://127.0.0.1:{index.port}/simple/ firmademo && ls /tmp/out")
    p = run_firma(["run", "--quiet", "--allow-host", f"127.0.0.1:{index.port}", *extra, "--", "sh", "-c", script],
                  cwd=ws, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == WHEEL, p.stdout + p.stderr
    return index.hits.count(f"/files/{WHEEL}")


def test_a_kept_pip_cache_serves_the_next_run(tmp_path, ws, index):
    require_tools()
    env = base_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache-home"))
    assert _download(index, ws, env, "--cache", "pip") == 1
    assert _download(index, ws, env, "--cache", "pip") == 1  # the second run asked nothing for the wheel
    # control: without the kept cache the wheel is fetched again
    assert _download(index, ws, env) == 2
    # the cache is firma's own, per workspace, and listed; clearing it makes the next run fetch again
    listed = subprocess.run(firma_cmd("cache", "list", "--json"), cwd=ws, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["caches"]["pip"] > 0 and rows[0]["path"].startswith(str(tmp_path / "cache-home" / "firma"))
    cleared = subprocess.run(firma_cmd("cache", "clear", "pip"), cwd=ws, env=env, capture_output=True, text=True)
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout
    assert _download(index, ws, env, "--cache", "pip") == 3


def test_the_proof_names_the_cache_and_its_risk(tmp_path, ws, index):
    require_tools()
    env = base_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache-home"))
    _download(index, ws, env, "--cache", "pip", "--proof-file", str(tmp_path / "proof.json"))
    doc = json.loads((tmp_path / "proof.json").read_text())
    assert any(w["setting"] == "caches" and "shared between the runs" in w["detail"] for w in doc["weakenings"])
    assert any(m["target"] == "/tmp/.firma-cache/pip" and not m["read_only"] for m in doc["mounts"])
    assert "PIP_CACHE_DIR" in doc["env_names"]


def test_cache_refusals(tmp_path, ws):
    require_tools()
    env = base_env(tmp_path, XDG_CACHE_HOME=str(ws / "cache"))
    p = run_firma(["run", "--cache", "pip", "--", "true"], cwd=ws, env=env)
    assert p.returncode == 1 and "inside the workspace" in p.stderr, p.stderr
    p = run_firma(["run", "--cache", "bower", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and "unknown cache 'bower'" in p.stderr
    assert not os.path.exists(ws / "cache")

"""Mutual TLS between `firma run` and a standalone sidecar (DESIGN §9 "Standalone sidecar"): a
client without a certificate, or with one from another CA, gets no answer and its forged
attribution never reaches the audit; `firma run` presenting the configured certificate is served
and its requests are decided and audited under its sandbox id. All on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import trustme

from linux_support import base_env, require_tools, run_firma

FORGED = b"GET http://forged.invalid/x HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_forged\r\nConnection: close\r\n\r\n"


def _client(port: int, ctx: ssl.SSLContext | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
            s.sendall(FORGED)
            return s.recv(4096)
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {type(exc).__name__}".encode()


def test_only_certified_clients_are_served_and_firma_run_presents_its_certificate(tmp_path):
    require_tools()
    ca, rogue = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    launcher = ca.issue_cert("firma-launcher")
    files = {}
    for name, blob in (("ca.pem", ca.cert_pem), ("server.pem", server.cert_chain_pems[0]),
                       ("server.key", server.private_key_pem), ("client.pem", launcher.cert_chain_pems[0]),
                       ("client.key", launcher.private_key_pem)):
        p = tmp_path / name
        blob.write_to_path(str(p))
        p.chmod(0o600)
        files[name] = str(p)
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "firma", "sidecar", "--listen", "tcp://127.0.0.1:0",
                             "--tls-cert", files["server.pem"], "--tls-key", files["server.key"],
                             "--client-ca", files["ca.pem"], "--audit", str(audit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:"), proc.stderr.read()
        port = int(endpoint.rsplit(":", 1)[1])
        plain = _client(port, None)
        no_cert = ssl.create_default_context(cafile=files["ca.pem"])
        wrong = ssl.create_default_context(cafile=files["ca.pem"])
        rogue.issue_cert("intruder").configure_cert(wrong)
        assert not plain.startswith(b"HTTP/")
        assert _client(port, no_cert).startswith(b"refused") or _client(port, no_cert) == b""
        assert not _client(port, wrong).startswith(b"HTTP/")
        # control: firma run with [run].sidecar_tls is served by the same sidecar
        cfg = tmp_path / "firma.toml"
        cfg.write_text(f'[run]\nsidecar_endpoint = "{endpoint}"\n'
                       f'sidecar_tls = {{ cert = "{files["client.pem"]}", key = "{files["client.key"]}", ca = "{files["ca.pem"]}" }}\n')
        ws = tmp_path / "ws"
        ws.mkdir()
        p = run_firma(["--config", str(cfg), "run", "--quiet", "--", "sh", "-c",
                       "curl -s -o /dev/null -w '%{http_code}' http://denied.invalid/via-mtls"], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0 and p.stdout == "403", p.stdout + p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    time.sleep(0.05)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["resource"] for e in events] == ["GET http://denied.invalid/via-mtls"]
    assert events[0]["sandbox_id"].startswith("sbx_") and events[0]["sandbox_id"] != "sbx_forged"

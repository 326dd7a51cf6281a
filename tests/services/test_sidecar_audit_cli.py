"""`firma sidecar` as a process (ready report, SIGTERM, audit flushed) and `firma audit verify|tail`."""

import asyncio
import json

import pytest
import os
import signal
import subprocess
import sys

from upstreams import HttpUpstream, run, send_raw

FIRMA = [sys.executable, "-m", "firma"]


def firma(*args, **kw):
    return subprocess.run(FIRMA + list(args), capture_output=True, text=True, timeout=60, **kw)


def test_standalone_sidecar_lifecycle_and_audit_commands(tmp_path):
    audit = tmp_path / "audit.jsonl"
    report = tmp_path / "ready.toml"

    async def main():
        up = await HttpUpstream(body=b"via-cli").start()
        proc = await asyncio.create_subprocess_exec(
            *FIRMA, "sidecar", "--listen", "tcp://127.0.0.1:0", "--allow-host", f"127.0.0.1:{up.port}",
            "--audit", str(audit), "--startup-report", str(report), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("tcp://127.0.0.1:"), line
        text = report.read_text()
        assert text == f'protocol_version = 2\nendpoint = "{line}"\n'
        port = int(line.rsplit(":", 1)[1])
        ok = await send_raw(port, f"GET http://127.0.0.1:{up.port}/x HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_a\r\nConnection: close\r\n\r\n".encode())
        no = await send_raw(port, b"GET http://evil.test/ HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_b\r\n\r\n")
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
        err = await proc.stderr.read()
        await up.aclose()
        return ok, no, rc, err

    ok, no, rc, err = run(main())
    assert ok.endswith(b"via-cli") and b"403" in no.split(b"\r\n")[0]
    assert rc == 0, err
    lines = audit.read_text().splitlines()
    assert len(lines) == 2  # flushed on SIGTERM
    assert (tmp_path / "audit.key").exists()

    v = firma("audit", "verify", str(audit))
    assert v.returncode == 0 and "2 lines verified" in v.stdout

    # reordered keys still verify; one tampered field fails naming its line
    evs = [json.loads(x) for x in lines]
    tampered = dict(evs[1], decision=1)
    reordered = dict(reversed(list(evs[0].items())))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(reordered) + "\n" + json.dumps(tampered) + "\n")
    v = firma("audit", "verify", str(bad), "--public-key", str(tmp_path / "audit.key"))
    assert v.returncode == 1 and "lines 2" in v.stdout and "line 2: bad signature" in v.stderr

    t = firma("audit", "tail", str(audit), "--decision", "deny", "--json")
    rows = [json.loads(x) for x in t.stdout.splitlines()]
    assert t.returncode == 0 and [r["sandbox_id"] for r in rows] == ["sbx_b"]
    t = firma("audit", "tail", str(audit), "--sandbox-id", "sbx_a")
    assert t.returncode == 0 and "allow" in t.stdout and "sbx_a" in t.stdout and "sbx_b" not in t.stdout
    t = firma("audit", "tail", str(audit), "--since", "2099-01-01T00:00:00Z", "--json")
    assert t.returncode == 0 and t.stdout == ""
    t = firma("audit", "tail", str(audit), "--since", "1h", "--json")
    assert len(t.stdout.splitlines()) == 2


def test_standalone_sidecar_refuses_bad_policy_without_report(tmp_path):
    pol = tmp_path / "p.cedar"
    pol.write_text("permit(principal, action, resource")
    report = tmp_path / "ready.toml"
    r = firma("sidecar", "--policy", str(pol), "--audit", str(tmp_path / "a.jsonl"), "--startup-report", str(report))
    assert r.returncode == 1 and r.stderr.startswith("[ERR]  Cedar policy") and r.stderr.count("\n") == 1
    assert not report.exists()
    r = firma("sidecar", "--allow-host", "*.com", "--audit", str(tmp_path / "a.jsonl"), "--startup-report", str(report))
    assert r.returncode == 1 and "*.com" in r.stderr and not report.exists()


def test_standalone_sidecar_unix_listen(tmp_path):
    sock = tmp_path / "sc.sock"

    async def main():
        proc = await asyncio.create_subprocess_exec(
            *FIRMA, "sidecar", "--listen", f"unix://{sock}", "--audit", str(tmp_path / "a.jsonl"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line == f"unix://{sock}"
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        r, w = await asyncio.open_unix_connection(str(sock))
        w.write(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
        resp = await asyncio.wait_for(r.read(), 10)
        w.close()
        proc.send_signal(signal.SIGTERM)
        return resp, await asyncio.wait_for(proc.wait(), 30)

    resp, rc = run(main())
    assert resp.startswith(b"HTTP/1.1 403") and rc == 0
    assert not sock.exists()  # removed on shutdown


def test_audit_tail_follow_prints_new_matching_lines(tmp_path):
    from firma.core import auditfmt

    key = auditfmt.generate_key()
    log = tmp_path / "audit.jsonl"
    log.write_text(auditfmt.signed_line(auditfmt.make_event(sandbox_id="sbx_old", decision=1, action="http.request"), key) + "\n")
    proc = subprocess.Popen(FIRMA + ["audit", "tail", str(log), "-f", "--json", "--decision", "deny"], stdout=subprocess.PIPE, text=True)
    try:
        with open(log, "a") as f:
            f.write(auditfmt.signed_line(auditfmt.make_event(sandbox_id="sbx_allow", decision=1), key) + "\n")
            f.write(auditfmt.signed_line(auditfmt.make_event(sandbox_id="sbx_new", decision=2, deny_reason="host_not_allowed"), key) + "\n")
        line = proc.stdout.readline()
        assert json.loads(line)["sandbox_id"] == "sbx_new"
    finally:
        proc.terminate()
        proc.wait(10)


def test_audit_tail_not_allowed_shows_denies_aborts_and_monitor_passes(tmp_path):
    log = tmp_path / "audit.jsonl"
    rows = [
        {"decision": 1, "deny_reason": "", "resource": "plain-allow.example:443"},
        {"decision": 2, "deny_reason": "host_not_allowed", "resource": "denied.example:443"},
        {"decision": 3, "deny_reason": "resolve_failed", "resource": "nxdomain.example:443"},
        {"decision": 1, "deny_reason": "monitor_mode:host_not_allowed", "resource": "monitored.example:443"},
    ]
    log.write_text("".join(json.dumps({"timestamp": 1, "sandbox_id": "sbx_x", "action": "network.connect", **r}) + "\n"
                           for r in rows))
    r = firma("audit", "tail", str(log), "--json", "--not-allowed")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line)["resource"] for line in r.stdout.splitlines()]
    assert got == ["denied.example:443", "nxdomain.example:443", "monitored.example:443"]
    deny_only = firma("audit", "tail", str(log), "--json", "--decision", "deny")  # control: the narrow filter
    assert [json.loads(line)["resource"] for line in deny_only.stdout.splitlines()] == ["denied.example:443"]


@pytest.mark.parametrize("listen", ["tcp://0.0.0.0:0", "tcp://[::]:0"])
def test_standalone_sidecar_refuses_a_network_listen_address(listen, tmp_path):
    """Without client authentication every client's attribution would be trusted: a listen address
    other than loopback or a unix socket is refused before anything binds (the loopback control is
    every other test of this file)."""
    r = firma("sidecar", "--listen", listen, "--audit", str(tmp_path / "audit.jsonl"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"[ERR]  refusing to listen on {listen}") and r.stderr.count("\n") == 1
    assert not (tmp_path / "audit.jsonl").exists()

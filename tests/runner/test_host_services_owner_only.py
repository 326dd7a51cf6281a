"""The runner backend's host bridge and DNS stub serve only the launching user (sock_diag):
another local user's proxy request and DNS query get nothing and leave no audit line, even a
thousand connections of theirs do not lock the agent out. Control: the launching user's request
through the same port is served."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded before the setuid child needs it (the venv may be unreadable to that user)
import json
import os
import pwd
import socket
import struct
import subprocess
import sys
import time

import pytest

from unprivileged_support import as_user

RUNNER = r'''#!/bin/sh
proxy=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["network"]["proxy_url"])' "$2")
dns=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["network"]["dns_stub_addr"])' "$2")
echo "$dns" > OUT/dns
echo "$proxy" > OUT/proxy.tmp && mv OUT/proxy.tmp OUT/proxy
while [ ! -e OUT/go ]; do sleep 0.05; done
curl -s -o /dev/null -w '%{http_code}' --max-time 20 -x "$proxy" http://owner.invalid/mine > OUT/code
'''


def _foreign_requests(port: int, dns: tuple[str, int]):
    replies = []
    held = []
    for _ in range(1000):  # a thousand connections that try to stay open
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            break
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET http://owner.invalid/theirs HTTP/1.1\r\nHost: owner.invalid\r\n\r\n")
    try:
        replies.append(s.recv(100).decode("latin-1"))
    except OSError as exc:
        replies.append(f"error {exc.errno}")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(1.5)
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x05other\x07invalid\x00" + struct.pack("!HH", 1, 1)
    u.sendto(q, dns)
    try:
        replies.append(u.recv(512).hex())
    except OSError:
        replies.append("no answer")
    return {"replies": replies, "held": len(held)}


def test_another_users_requests_get_nothing_and_the_owner_still_gets_through(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the second local user is made by setuid; CI runs as root")
    other = pwd.getpwnam("firma-test")
    out = tmp_path / "out"
    out.mkdir()
    runner = tmp_path / "runner.sh"
    runner.write_text(RUNNER.replace("OUT", str(out)))
    runner.chmod(0o755)
    ws = tmp_path / "ws"
    ws.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "FIRMA_STATE_DIR": str(state), "FIRMA_RUN_RUNNER": str(runner),
           "LANG": "C.UTF-8"}
    proc = subprocess.Popen([sys.executable, "-m", "firma", "run", "--backend", "runner", "--quiet", "--", "true"],
                            cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (out / "proxy").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        port = int((out / "proxy").read_text().strip().rsplit(":", 1)[1])
        dhost, dport = (out / "dns").read_text().strip().rsplit(":", 1)
        got = as_user(other.pw_uid, other.pw_gid, lambda: _foreign_requests(port, (dhost, int(dport))))
        assert got.get("replies") == ["", "no answer"], got  # closed without a byte; no DNS answer
        (out / "go").touch()
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "code").read_text() == "403"  # control: the owner's request was served (and denied)
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    resources = [e["resource"] for e in audit]
    assert any("/mine" in r for r in resources)
    assert not any("/theirs" in r or "other.invalid" in r for r in resources)
    log_hits = list(state.glob("proofs/*.run.log"))
    proof = json.loads(next(state.glob("proofs/sbx_*.json")).read_text())
    check = next(c for c in proof["checks"] if c["name"] == "host_services")
    assert f"only uid {os.geteuid()}'s sockets are served" in check["detail"]
    assert log_hits == [] or all("Traceback" not in p.read_text() for p in log_hits)

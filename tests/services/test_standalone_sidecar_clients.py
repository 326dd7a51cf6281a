"""The standalone sidecar serves only its owner's processes, plus the uids named with --allow-uid:
another local user's request on the loopback port or the unix socket gets nothing and leaves no
audit line. Control: the owner's request through the same listener is answered."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded before the setuid child needs it (the venv may be unreadable to it)
import json
import os
import pwd
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from unprivileged_support import as_user

FIRMA = [sys.executable, "-m", "firma"]
REQ = b"GET http://evil.invalid/x HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_stranger\r\nConnection: close\r\n\r\n"


def _reply(endpoint: str) -> str:
    """What another user gets: the reply's first bytes, or the errno of a refused exchange."""
    try:
        return _ask(endpoint).decode("latin-1")
    except OSError as exc:
        return f"error {exc.errno}"


def _ask(endpoint: str) -> bytes:
    if endpoint.startswith("unix://"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(endpoint[len("unix://"):])
    else:
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
    with s:
        s.sendall(REQ)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            pass
        return out


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_only_the_owner_and_allowed_uids_are_served(tmp_path, kind):
    if os.geteuid() != 0:
        pytest.fail("the second local user is made by setuid; CI runs as root")
    other = pwd.getpwnam("firma-test")
    # A socket directory the other user can reach (pytest's are 0700): the uid check must decide.
    sockdir = tempfile.mkdtemp(prefix="firma-test-sock-", dir="/tmp")
    os.chmod(sockdir, 0o755)
    for allow in ([], ["--allow-uid", str(other.pw_uid)]):
        audit = tmp_path / f"audit{len(allow)}.jsonl"
        listen = "tcp://127.0.0.1:0" if kind == "tcp" else f"unix://{sockdir}/s{len(allow)}.sock"
        proc = subprocess.Popen([*FIRMA, "sidecar", "--listen", listen, "--audit", str(audit), *allow],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            endpoint = proc.stdout.readline().strip()
            assert endpoint.startswith(kind), proc.stderr.read()
            if kind == "unix":
                os.chmod(endpoint[len("unix://"):], 0o777)
            theirs = as_user(other.pw_uid, other.pw_gid, lambda ep=endpoint: _reply(ep))
            mine = _ask(endpoint)
            assert mine.startswith(b"HTTP/1.1 403")  # control: the owner is answered (and denied)
            if allow:
                assert theirs.startswith("HTTP/1.1 403")  # an allowed uid is served too
            else:
                assert theirs in ("", "error 104", "error 32"), theirs  # closed, reset, or broken pipe
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        time.sleep(0.05)
        sandboxes = [json.loads(line)["sandbox_id"] for line in audit.read_text().splitlines()]
        assert sandboxes == ["sbx_stranger"] * (2 if allow else 1)
        if not allow:
            assert "refused 1 connections from other users" in proc.stderr.read()
    shutil.rmtree(sockdir)


def test_one_client_cannot_take_every_connection(tmp_path):
    """`--max-client-connections 3`: a client holding three connections gets 503 on a fourth,
    which is audited (and aggregated by the audit's caps in a flood); a different client — an
    allowed uid — is still served. Control: after the three close, the first client is served again."""
    if os.geteuid() != 0:
        pytest.fail("the second local user is made by setuid; CI runs as root")
    other = pwd.getpwnam("firma-test")
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([*FIRMA, "sidecar", "--listen", "tcp://127.0.0.1:0", "--audit", str(audit),
                             "--max-client-connections", "3", "--allow-uid", str(other.pw_uid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
        time.sleep(0.3)  # each is attributed and counted
        fourth = _ask(endpoint)
        assert b"too_many_client_connections" in fourth, fourth
        theirs = as_user(other.pw_uid, other.pw_gid, lambda: _reply(endpoint))
        assert theirs.startswith("HTTP/1.1 403"), theirs  # another client is not locked out
        for s in held:
            s.close()
        time.sleep(0.3)
        assert _ask(endpoint).startswith(b"HTTP/1.1 403")  # control
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    reasons = [json.loads(line)["deny_reason"] for line in audit.read_text().splitlines()]
    assert "too_many_client_connections" in reasons


def test_one_client_cannot_flood_requests(tmp_path):
    """`--max-client-rate 5`: a burst of 40 requests on one keep-alive connection gets 429 once the
    client's bucket (10) is empty; another client is still served. Control: the first requests of
    the burst are decided (403)."""
    if os.geteuid() != 0:
        pytest.fail("the second local user is made by setuid; CI runs as root")
    other = pwd.getpwnam("firma-test")
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([*FIRMA, "sidecar", "--listen", "tcp://127.0.0.1:0", "--audit", str(audit),
                             "--max-client-rate", "5", "--allow-uid", str(other.pw_uid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        statuses = []
        for _ in range(40):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(REQ)
                statuses.append(s.recv(64).split(b" ")[1])
        assert statuses[0] == b"403" and b"429" in statuses, statuses
        assert statuses.count(b"403") <= 12  # the burst, plus what refilled meanwhile
        theirs = as_user(other.pw_uid, other.pw_gid, lambda: _reply(endpoint))
        assert theirs.startswith("HTTP/1.1 403"), theirs  # another client has its own bucket
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

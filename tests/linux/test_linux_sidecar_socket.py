"""The embedded sidecar is reachable only by this launcher's bridge: a unix socket in a 0700
directory, never a host loopback port that any local process could use to forge attributed
requests into the signed audit."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

from linux_support import base_env, firma_cmd, wait_for


def _run_and_inspect(ws: Path, env: dict[str, str]) -> tuple[str, os.stat_result, dict]:
    ready, release = ws / "ready", ws / "release"
    # a request through the proxy proves the bridge reached the sidecar (403 is its decision)
    script = (f"curl -s -o /dev/null -w '%{{http_code}}' http://denied.invalid/ > {ws}/code; touch {ready}; "
              f"while [ ! -e {release} ]; do sleep 0.05; done")
    proc = subprocess.Popen(
        firma_cmd("run", "--proof-file", str(ws / "proof.json"), "--", "sh", "-c", script),
        cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(ready, proc, limit=30)
        run_logs = list(Path(env["FIRMA_STATE_DIR"]).glob("run/sbx_*/run.log"))
        assert len(run_logs) == 1
        m = re.search(r"embedded sidecar ready: .* listening at unix://(\S+)", run_logs[0].read_text())
        assert m, run_logs[0].read_text()
        sock = m.group(1)
        dir_stat = os.stat(os.path.dirname(sock))
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        release.touch()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return sock, dir_stat, json.loads((ws / "proof.json").read_text())


def test_embedded_sidecar_listens_on_a_private_unix_socket(ws, tmp_path):
    sock, dir_stat, proof = _run_and_inspect(ws, base_env(tmp_path))
    assert stat.S_IMODE(dir_stat.st_mode) == 0o700 and dir_stat.st_uid == os.getuid()
    assert proof["sidecar"] == {"endpoint": f"unix://{sock}", "embedded": True}
    assert not os.path.exists(sock)  # removed with the run


def test_long_state_root_still_gets_a_private_socket(ws, tmp_path):
    """A state root longer than a socket address allows: the socket stays in the private run dir
    (bound and reached through the directory's descriptor), never in $TMPDIR or another shorter
    place a sandbox might see. Control: the run's request is decided (the bridge reached it)."""
    state = tmp_path / ("s" * 120)  # the run dir alone is longer than sun_path
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    before = set(Path("/tmp").glob("firma-sidecar-*"))
    sock, dir_stat, proof = _run_and_inspect(ws, base_env(tmp_path, FIRMA_STATE_DIR=str(state), TMPDIR=str(tmpdir)))
    assert len(os.fsencode(sock)) > 107 and sock.startswith(str(state / "run")) and sock.endswith("/sidecar.sock")
    assert stat.S_IMODE(dir_stat.st_mode) == 0o700 and dir_stat.st_uid == os.getuid()
    assert proof["sidecar"]["endpoint"] == f"unix://{sock}"
    assert (ws / "code").read_text() == "403"
    assert list(tmpdir.iterdir()) == [] and set(Path("/tmp").glob("firma-sidecar-*")) == before


HEALTH = b"GET /__firma/health HTTP/1.1\r\nhost: firma\r\n\r\n"


def _connect_as(uid: int, sock: str) -> bytes:
    """Fork; in the child become `uid` and ask the sidecar for its health. The child keeps its
    capabilities (SECBIT_NO_SETUID_FIXUP), so the 0700 directory and the 0600 socket do not stop
    it: only the sidecar's SO_PEERCRED check is left to refuse it."""
    import ctypes
    import socket

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        data = b""
        try:
            dir_fd = os.open(os.path.dirname(sock), os.O_PATH | os.O_DIRECTORY)
            if uid != os.geteuid():
                PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP = 28, 1 << 2
                if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl")
                os.setresuid(uid, uid, uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect(f"/proc/self/fd/{dir_fd}/{os.path.basename(sock)}")
            c.sendall(HEALTH)
            data = c.recv(200) or b"<closed>"
        except OSError as exc:
            data = f"<error {exc}>".encode()
        finally:
            try:
                os.write(w, data)
            finally:
                os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read()


def test_a_connection_from_another_uid_is_refused(ws, tmp_path):
    """The embedded sidecar answers only the launcher's uid (SO_PEERCRED), whatever reaches its
    socket. Control: the launcher's uid through the same path gets the health answer."""
    import pwd

    if os.geteuid() != 0:
        raise AssertionError("the other uid is made by setresuid; CI runs as root")
    other = pwd.getpwnam("firma-test").pw_uid
    env = base_env(tmp_path)
    ready, release = ws / "ready", ws / "release"
    proc = subprocess.Popen(firma_cmd("run", "--quiet", "--", "sh", "-c", f"touch {ready}; while [ ! -e {release} ]; do sleep 0.05; done"),
                            cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, proc, limit=30)
        (run_dir,) = Path(env["FIRMA_STATE_DIR"]).glob("run/sbx_*")
        sock = str(run_dir / "sidecar.sock")
        mine = _connect_as(os.geteuid(), sock)
        theirs = _connect_as(other, sock)
        release.touch()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mine.startswith(b"HTTP/1.1 200"), mine  # control
    # closed unanswered: seen as EOF, a reset, or a broken pipe when the close beats the request
    assert theirs == b"<closed>" or b"reset" in theirs or b"Broken pipe" in theirs, theirs

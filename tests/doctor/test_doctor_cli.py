"""`firma doctor` end to end on this host (real bwrap, real seccomp, loopback sidecar probes)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from firma.host import detect_host
from firma.backends.preflight import bwrap_preflight
from firma.seccomp.store import prepare_filter


def doctor(tmp_path, env_extra=None, path=None, args=("--json",)):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    state = tmp_path / "state"
    env = {"HOME": str(home), "PATH": path if path is not None else os.environ.get("PATH", ""),
           "FIRMA_STATE_DIR": str(state)}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "firma", "doctor", *args], cwd=str(home), env=env,
                          capture_output=True, text=True, timeout=60)
    return proc


def checks_of(proc):
    doc = json.loads(proc.stdout)
    return doc, {c["name"]: c for c in doc["checks"]}


def test_doctor_json_ok_on_this_host_and_agrees_with_run(tmp_path):
    if shutil.which("bwrap") is None:
        pytest.fail("bwrap is required; run scripts/install-system-deps.sh")
    bwrap_preflight(detect_host())  # what `firma run` checks: must pass here
    proc = doctor(tmp_path)
    doc, checks = checks_of(proc)
    assert proc.returncode == 0, proc.stdout
    assert doc["ok"] is True
    assert checks["bwrap_backend"]["status"] == "OK"
    assert "with the seccomp filter" in checks["bwrap_backend"]["detail"]
    assert checks["bubblewrap"]["status"] == "OK"
    assert checks["seccomp"]["status"] == "OK"


def _host_config(tmp_path, bwrap: str):
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[host]\nbwrap = "{bwrap}"\n')
    return {"FIRMA_CONFIG": str(cfg)}


def test_doctor_fails_when_the_configured_bwrap_is_missing(tmp_path):
    proc = doctor(tmp_path, _host_config(tmp_path, str(tmp_path / "no-bwrap")))
    doc, checks = checks_of(proc)
    assert proc.returncode == 1
    assert doc["ok"] is False
    assert checks["bubblewrap"]["status"] == "FAIL" and "[host].bwrap" in checks["bubblewrap"]["detail"]
    assert checks["bwrap_backend"]["status"] == "FAIL"
    # firma run on the same host refuses for the same reason.
    run_host = detect_host({}, binaries={"bwrap": str(tmp_path / "no-bwrap")})
    with pytest.raises(Exception) as info:
        bwrap_preflight(run_host)
    assert str(info.value) in checks["bwrap_backend"]["detail"]


def test_a_bwrap_others_can_write_is_refused_and_never_run(tmp_path):
    """[host].bwrap naming a group-writable copy: refused by doctor and by run, and the copy never
    ran (it would leave a marker). Control: the same copy, made writable only by its owner, runs."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    marker = tmp_path / "fake-ran"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexec /usr/bin/bwrap \"$@\"\n")
    fake.chmod(0o775)
    env = _host_config(tmp_path, str(fake))
    doc, checks = checks_of(doctor(tmp_path, env))
    assert checks["bubblewrap"]["status"] == "FAIL" and "writable by group or others" in checks["bubblewrap"]["detail"]
    assert not marker.exists()
    fake.chmod(0o755)
    doc, checks = checks_of(doctor(tmp_path, env))
    assert checks["bubblewrap"]["status"] == "OK" and str(fake) in checks["bubblewrap"]["detail"]
    assert marker.exists()


def test_bwrap_on_path_is_never_taken(tmp_path):
    """A workspace venv first on PATH holding a `bwrap` the agent wrote earlier: firma uses the
    system one. Control: the shell's own lookup on the same PATH finds the planted one."""
    venv_bin = tmp_path / "ws" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (venv_bin / "bwrap").write_text(f"#!/bin/sh\ntouch {marker}\nexec /usr/bin/bwrap \"$@\"\n")
    (venv_bin / "bwrap").chmod(0o755)
    path = f"{venv_bin}::{os.environ.get('PATH', '/usr/bin:/bin')}"
    found = subprocess.run(["sh", "-c", "command -v bwrap"], env={"PATH": path}, capture_output=True, text=True)
    assert found.stdout.strip() == str(venv_bin / "bwrap")  # control
    doc, checks = checks_of(doctor(tmp_path, path=path))
    assert checks["bubblewrap"]["status"] == "OK" and "/usr/bin/bwrap" in checks["bubblewrap"]["detail"]
    assert not marker.exists()
    assert detect_host({"PATH": path}).bwrap_path == "/usr/bin/bwrap"


def test_doctor_text_output(tmp_path):
    proc = doctor(tmp_path, _host_config(tmp_path, "/nonexistent/bwrap"), args=())
    assert proc.returncode == 1
    assert "FAIL  bubblewrap" in proc.stdout and "fix: " in proc.stdout


def test_tampered_stored_artifact_fails_seccomp_check(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    art = prepare_filter(None, str(state), os.uname().machine)
    data = bytearray(open(art.path, "rb").read())
    data[0] ^= 1
    open(art.path, "wb").write(bytes(data))
    proc = doctor(tmp_path)
    _, checks = checks_of(proc)
    assert proc.returncode == 1
    assert checks["seccomp"]["status"] == "FAIL"
    assert "firma run would refuse" in checks["seccomp"]["detail"]


def test_state_dir_with_group_access_fails(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o770)
    proc = doctor(tmp_path)
    _, checks = checks_of(proc)
    assert checks["state_dir"]["status"] == "FAIL"
    assert checks["state_dir"]["remediation"] == f"chmod 700 {state}"


def test_bad_config_and_bad_seccomp_policy(tmp_path):
    cfg = tmp_path / "firma.toml"
    cfg.write_text("[run\n")
    proc = doctor(tmp_path, {"FIRMA_CONFIG": str(cfg)})
    _, checks = checks_of(proc)
    assert proc.returncode == 1 and checks["config"]["status"] == "FAIL"
    # Same loader as firma run: an unknown key is named.
    cfg.write_text("[run]\nbogus_key = 1\n")
    _, checks = checks_of(doctor(tmp_path, {"FIRMA_CONFIG": str(cfg)}))
    assert checks["config"]["status"] == "FAIL" and "bogus_key" in checks["config"]["detail"]

    pol = tmp_path / "seccomp.toml"
    pol.write_text('policy_id = "p"\npolicy_version = "1"\ndefault_action = "allow"\n'
                   'deny_actions = ["system.reboot"]\n')
    cfg.write_text('[run]\nseccomp_policy = { source_policy_path = "seccomp.toml", '
                   'artifact_dir = "artifacts" }\n')
    proc = doctor(tmp_path, {"FIRMA_CONFIG": str(cfg)})
    _, checks = checks_of(proc)
    assert checks["seccomp"]["status"] == "FAIL"
    assert "unknown action 'system.reboot'" in checks["seccomp"]["detail"]


class Listener:
    """Loopback TCP listener that records every accepted connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.accepted += 1
        conn.close()

    def close(self):
        self.sock.close()


def test_sidecar_endpoint_reachability(tmp_path):
    """A real `firma sidecar` answers; a port that accepts but is not a sidecar, and a closed
    port, fail. The recording listener proves the probe reached the far side."""
    import time

    report = tmp_path / "ready.toml"
    side = subprocess.Popen([sys.executable, "-m", "firma", "sidecar", "--listen",
                             "tcp://127.0.0.1:0", "--audit", str(tmp_path / "audit.jsonl"),
                             "--startup-report", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # the report is written atomically once the sidecar is ready
            if report.exists() or side.poll() is not None:
                break
            time.sleep(0.05)
        assert report.exists(), side.stderr.read() if side.poll() is not None else "no report"
        import tomllib

        endpoint = tomllib.loads(report.read_text())["endpoint"]
        proc = doctor(tmp_path, {"FIRMA_SIDECAR_ENDPOINT": endpoint})
        _, checks = checks_of(proc)
        assert checks["sidecar"]["status"] == "OK", checks["sidecar"]
    finally:
        side.terminate()
        side.wait(10)

    lst = Listener()
    try:
        proc = doctor(tmp_path, {"FIRMA_SIDECAR_ENDPOINT": f"tcp://127.0.0.1:{lst.port}"})
        _, checks = checks_of(proc)
        lst.thread.join(10)
        assert lst.accepted == 1  # the probe reached the far side …
        assert checks["sidecar"]["status"] == "FAIL"  # … which is not a sidecar
    finally:
        lst.close()
    proc = doctor(tmp_path, {"FIRMA_SIDECAR_ENDPOINT": f"tcp://127.0.0.1:{lst.port}"})
    _, checks = checks_of(proc)
    assert proc.returncode == 1 and checks["sidecar"]["status"] == "FAIL"
    proc = doctor(tmp_path, {"FIRMA_SIDECAR_ENDPOINT": "tcp://nowhere"})
    _, checks = checks_of(proc)
    assert checks["sidecar"]["status"] == "FAIL" and "invalid sidecar endpoint" in \
        checks["sidecar"]["detail"]


def test_smoke_sandbox_failure_fails_even_when_preflight_passes(tmp_path):
    """A bwrap that reports a version but cannot build a sandbox (what AppArmor or a container
    profile does to a real one): the preflight passes, the launch would fail, doctor says FAIL."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "bwrap"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "bubblewrap 0.8.0"; exit 0; fi\n'
                    'echo "bwrap: setting up uid map: Permission denied" >&2\nexit 1\n')
    fake.chmod(0o755)
    bwrap_preflight(detect_host({}, binaries={"bwrap": str(fake)}))  # run's preflight: passes
    proc = doctor(tmp_path, _host_config(tmp_path, str(fake)))
    _, checks = checks_of(proc)
    assert proc.returncode == 1
    assert checks["bubblewrap"]["status"] == "OK"
    assert checks["bwrap_backend"]["status"] == "FAIL"
    assert "uid map: Permission denied" in checks["bwrap_backend"]["detail"]

"""The reference runner refuses before the command runs: an invalid or readable-by-others
contract, or host paths that do not answer (fail_closed_startup). Each refusal has a positive
control — the same contract, fixed, does run the command (its marker file appears)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from firma.core.contract import build_contract, contract_json
from firma.core.model import ExecutionEnvelope, IdentityMode, Invariant, INVARIANT_NAMES, Mount, NetworkEndpoints, frozen_map

pytestmark = pytest.mark.confinement

RUNNER = str(Path(sys.executable).parent / "firma-runner-linux")


class StandIns:
    """Loopback stand-ins for the host bridge (answers HTTP 200) and DNS stub (REFUSED): the
    reference runner only relays bytes to them, so these exercise the runner itself."""

    def __init__(self) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.requests: list[bytes] = []
        threading.Thread(target=self._tcp, daemon=True).start()
        threading.Thread(target=self._udp, daemon=True).start()

    def _tcp(self):
        while True:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    data = c.recv(4096)
                except OSError:
                    data = b""
                if data:
                    self.requests.append(data)
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def _udp(self):
        while True:
            try:
                d, a = self.udp.recvfrom(4096)
            except OSError:
                return
            if len(d) >= 12:
                self.udp.sendto(d[:2] + bytes([d[2] | 0x80, 0x05]) + struct.pack("!HHHH", 0, 0, 0, 0), a)

    @property
    def proxy_url(self):
        return f"http://127.0.0.1:{self.tcp.getsockname()[1]}"

    @property
    def dns(self):
        return f"127.0.0.1:{self.udp.getsockname()[1]}"

    def close(self):
        self.tcp.close()
        self.udp.close()


@pytest.fixture
def standins():
    s = StandIns()
    yield s
    s.close()


def write_contract(tmp_path: Path, proxy_url: str, dns: str, script: str, *, mode=0o600, startup="required",
                   home: str | None = None, extra_mounts: tuple = ()):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    home = home or str(work)
    sbx = "sbx_" + os.urandom(16).hex()
    env = ExecutionEnvelope(
        sandbox_id=sbx, runtime_dir=f"{tmp_path}/state/run/{sbx}", executable="/bin/sh", args=("-c", script),
        cwd=str(work), env=frozen_map({"PATH": "/usr/bin:/bin", "HOME": home, "HTTP_PROXY": proxy_url}),
        identity_mode=IdentityMode.SANDBOX_USER, home=home, seccomp_filter_path=None,
        mounts=(Mount(str(work), str(work), False), *extra_mounts), mask_home_paths=(),
        network=NetworkEndpoints(proxy_url, dns, frozen_map({"x-firma-sandbox-id": sbx})),
        invariants=tuple(Invariant(n, startup if n == "fail_closed_startup" else "required") for n in INVARIANT_NAMES),
    )
    path = tmp_path / f"{sbx}.json"
    path.write_text(contract_json(build_contract(env, RUNNER)))
    os.chmod(path, mode)
    return path, work


def run_runner(path, cwd):
    return subprocess.run([RUNNER, "--launch-contract", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={"PATH": "/usr/bin:/bin"})


def test_readable_by_others_contract_is_refused(tmp_path, standins):
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker", mode=0o644)
    r = run_runner(path, work)
    assert r.returncode == 1
    assert r.stderr.startswith("[ERR]  launch contract") and "group/other bits" in r.stderr
    assert not (work / "marker").exists()
    # Positive control: the same contract at 0600 runs the command.
    os.chmod(path, 0o600)
    r = run_runner(path, work)
    assert r.returncode == 0, r.stderr
    assert (work / "marker").read_text() == "ran\n"


def test_invalid_contract_is_refused(tmp_path, standins):
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker")
    data = json.loads(path.read_text())
    data["command"]["args"].append("")
    data["surprise"] = True
    path.write_text(json.dumps(data))
    r = run_runner(path, work)
    assert r.returncode == 1 and not (work / "marker").exists()
    assert "/command/args/2: must not be empty" in r.stderr and "/surprise: unknown key" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bridge_down_refuses_to_start(tmp_path, standins):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    port = dead.getsockname()[1]
    path, work = write_contract(tmp_path, f"http://127.0.0.1:{port}", standins.dns, "echo ran > marker")
    r = run_runner(path, work)
    dead.close()
    assert r.returncode == 1 and not (work / "marker").exists()
    assert "refusing to start the command (fail_closed_startup)" in r.stderr


def test_startup_check_can_be_disabled_by_policy(tmp_path, standins):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    path, work = write_contract(tmp_path, f"http://127.0.0.1:{port}", standins.dns, "echo ran > marker",
                                startup="disabled_by_policy")
    r = run_runner(path, work)
    dead.close()
    assert r.returncode == 0, r.stderr
    assert (work / "marker").exists() and "disabled_by_policy" in r.stderr


def test_agent_reaches_the_bridge_only_through_the_planted_endpoint(tmp_path, standins):
    # Inside: HTTP_PROXY names 127.0.0.1:18080 and a request through it reaches the bridge.
    script = (
        'echo "$HTTP_PROXY" > proxyvar; exec /usr/bin/python3 -c '
        "\"import socket;s=socket.create_connection(('127.0.0.1',18080));"
        "s.sendall(b'GET http://x/inside HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');"
        "open('reply','wb').write(s.recv(100))\""
    )
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, script)
    r = run_runner(path, work)
    assert r.returncode == 0, r.stderr
    assert (work / "proxyvar").read_text().strip() == "http://127.0.0.1:18080"
    assert (work / "reply").read_bytes().startswith(b"HTTP/1.1 200")
    assert any(b"/inside" in q for q in standins.requests)


def test_home_credentials_are_masked(tmp_path, standins):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SECRET-KEY\n")
    (home / ".netrc").write_text("machine x password SECRET\n")
    (home / "notes.txt").write_text("visible\n")
    home.chmod(0o755)
    script = ('cat "$HOME/notes.txt" > notes; cat "$HOME/.ssh/id_ed25519" "$HOME/.netrc" > seen 2>/dev/null; '
              'ls -a "$HOME/.ssh" > listing 2>/dev/null; true')
    # Positive control: outside any runner the same command reads both.
    ctl = tmp_path / "control"
    ctl.mkdir()
    subprocess.run(["/bin/sh", "-c", script], cwd=ctl, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True)
    assert "SECRET-KEY" in (ctl / "seen").read_text() and "id_ed25519" in (ctl / "listing").read_text()
    # The home is visible inside (a read-only mount, as a real home is under `/`), its secrets not.
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, script, home=str(home),
                                extra_mounts=(Mount(str(home), str(home), True),))
    r = run_runner(path, work)
    assert r.returncode == 0, r.stderr
    assert (work / "notes").read_text() == "visible\n"
    assert "SECRET" not in (work / "seen").read_text()
    assert "id_ed25519" not in (work / "listing").read_text()


def test_measured_checks_go_to_the_log_file_not_the_commands_output(tmp_path, standins):
    """The sandbox's measured checks are kept (in --log-file), never mixed into the command's
    stdout/stderr."""
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran")
    log = tmp_path / "runner.log"
    r = subprocess.run([RUNNER, "--launch-contract", str(path), "--log-file", str(log)], capture_output=True,
                       text=True, timeout=120, cwd=work, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ran\n" and "check " not in r.stderr
    text = log.read_text()
    for name in ("netns_only_loopback", "planted_sockets", "resolv_conf_points_at_stub", "masked_paths",
                 "agent_no_new_privs"):
        assert f"firma-runner-linux: check {name} ok=true" in text, text
    assert os.stat(log).st_mode & 0o077 == 0


BAD_MOUNTS = {
    "/": "exposes the host's /proc or /sys",
    "/proc": "exposes the host's /proc or /sys",
    "/dev": "exposes the host's /dev",
    "/etc/shadow": "root-only secret",
    "/etc": "root-only secret",
    "/usr/../etc": "must not contain '..'",
}


@pytest.mark.parametrize("source", sorted(BAD_MOUNTS))
def test_contract_mounts_follow_the_config_mount_rules(tmp_path, standins, source):
    """A contract mounting the host's /, /proc, /dev, a root-only secret or a `..` path read-write:
    `firma contract validate` and the reference runner refuse it in one line and nothing runs.
    Control: the same contract without that mount runs (the other tests)."""
    target = tmp_path / "mnt"
    target.mkdir()
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker",
                                extra_mounts=(Mount(source, str(target), False),))
    r = run_runner(path, work)
    assert r.returncode == 1 and not (work / "marker").exists(), r.stderr
    assert r.stderr.startswith("[ERR]  ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "/mounts/1" in r.stderr and BAD_MOUNTS[source] in r.stderr
    v = subprocess.run([sys.executable, "-m", "firma", "contract", "validate", str(path)], capture_output=True, text=True)
    assert v.returncode == 1 and BAD_MOUNTS[source] in v.stderr


def test_sandbox_id_that_is_not_firmas_format_is_refused(tmp_path, standins):
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker")
    data = json.loads(path.read_text())
    bad = "sbx_../../../../tmp/escape"
    data["sandbox_id"] = bad
    data["network"]["attribution_headers"]["x-firma-sandbox-id"] = bad
    path.write_text(json.dumps(data))
    r = run_runner(path, work)
    assert r.returncode == 1 and not (work / "marker").exists()
    assert "/sandbox_id: must be firma's sandbox id format" in r.stderr
    assert not Path("/tmp/escape").exists()


def test_a_lone_surrogate_is_one_line_not_a_traceback(tmp_path, standins):
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker")
    text = path.read_text().replace('"-c"', '"\\ud800"', 1)
    path.write_text(text)
    r = run_runner(path, work)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "/command/args/0: contains a lone surrogate" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_contract_without_a_filter_still_gets_the_hardening_filter(tmp_path, standins):
    """`seccomp_filter_path: null`: the reference runner applies firma's built-in filter, so a
    set-id mode is refused inside. Control: the same chmod outside succeeds."""
    ctl = tmp_path / "ctl"
    ctl.write_text("x")
    os.chmod(ctl, 0o4755)
    assert ctl.stat().st_mode & 0o4000  # control
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns,
                                "cp /bin/true t && chmod 4755 t; echo $? > status")
    assert json.loads(path.read_text())["command"]["seccomp_filter_path"] is None
    r = run_runner(path, work)
    assert r.returncode == 0, r.stderr
    assert (work / "status").read_text().strip() != "0"
    assert not (work / "t").stat().st_mode & 0o4000


def test_a_contract_owned_by_another_user_in_a_world_writable_directory_is_refused(tmp_path, standins):
    """Another local user's contract in a shared directory: the root runner never reads it.
    Control: the same contract in a private directory of ours runs (the other tests)."""
    import pwd

    if os.geteuid() != 0:
        pytest.fail("the test chowns a file to another user; CI runs as root")
    other = pwd.getpwnam("firma-test")
    path, work = write_contract(tmp_path, standins.proxy_url, standins.dns, "echo ran > marker")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / "launch.json"
    planted.write_bytes(path.read_bytes())
    planted.chmod(0o600)
    os.chown(planted, other.pw_uid, other.pw_gid)
    r = run_runner(planted, work)
    assert r.returncode == 1 and not (work / "marker").exists()
    assert r.stderr.startswith("[ERR]  ") and ("owned by uid" in r.stderr or "writable by other users" in r.stderr), r.stderr


def test_the_agents_pythonpath_never_reaches_the_reference_runner(tmp_path):
    """`firma run --backend runner` with the reference runner and PYTHONPATH set for the agent: a
    sitecustomize.py there is not imported by the runner (it runs with firma's own environment).
    Control: the same interpreter with that PYTHONPATH imports it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "imported"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    subprocess.run([sys.executable, "-c", "pass"], env={"PYTHONPATH": str(evil)}, check=True)
    assert marker.exists()  # control
    marker.unlink()
    ws = tmp_path / "ws"
    ws.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[run]\nenv_set = {{ PYTHONPATH = "{evil}" }}\n')
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "FIRMA_STATE_DIR": str(tmp_path / "state"),
           "FIRMA_RUN_RUNNER": RUNNER, "LANG": "C.UTF-8"}
    r = subprocess.run([sys.executable, "-m", "firma", "--config", str(cfg), "run", "--backend", "runner", "--quiet",
                        "--", "true"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def _cmdline_procs(needle: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def test_kill_9_of_firma_takes_the_reference_runner_and_its_agent_along(tmp_path):
    import signal
    import time

    ws = tmp_path / "ws"
    ws.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    needle = f"{300 + int.from_bytes(os.urandom(2), 'big') % 1000}.25"
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "FIRMA_STATE_DIR": str(tmp_path / "state"),
           "FIRMA_RUN_RUNNER": RUNNER, "LANG": "C.UTF-8"}
    p = subprocess.Popen([sys.executable, "-m", "firma", "run", "--backend", "runner", "--quiet", "--",
                          "sh", "-c", f"touch ready; exec sleep {needle}"], cwd=ws, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (ws / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.02)
        time.sleep(0.2)
        assert _cmdline_procs(f"sleep\0{needle}")  # control: the agent runs
        runners = _cmdline_procs("firma-runner-linux")
        assert runners
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 1.0
        while (_cmdline_procs(f"sleep\0{needle}") or set(_cmdline_procs("firma-runner-linux")) & set(runners)) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _cmdline_procs(f"sleep\0{needle}") == []
        assert set(_cmdline_procs("firma-runner-linux")) & set(runners) == set()
    finally:
        if p.poll() is None:
            p.kill()
        for pid in _cmdline_procs(f"sleep\0{needle}"):
            os.kill(pid, signal.SIGKILL)

"""Shared helpers for the Linux `firma run` tests: recording listeners on host loopback (they
record every connection that reaches them) and a runner for the real CLI."""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DRIVE = HERE / "linux_drive.py"
PROBE = HERE / "linux_probe.py"
SYSTEM_PYTHON = "/usr/bin/python3"

REQUIRED_TOOLS = ("bwrap", "curl", "dig", "getent", "bash", "useradd", "setpriv")


def require_tools() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        missing.append(SYSTEM_PYTHON)
    if missing:
        pytest.fail(f"confinement tests need {', '.join(missing)}; run scripts/install-system-deps.sh")


class Recorder:
    """A listener that records everything that reaches it."""

    def __init__(self) -> None:
        self.hits: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = False

    def record(self, data: bytes) -> None:
        with self._lock:
            self.hits.append(data)

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()


class StreamRecorder(Recorder):
    def __init__(self, family: int, addr) -> None:
        super().__init__()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(16)
        self.addr = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(2)
            try:
                data = c.recv(100)
            except OSError:
                data = b""
            self.record(b"CONNECT:" + data)
            c.close()

    def close(self) -> None:
        self.sock.close()


class UdpRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(1000)
            except OSError:
                return
            self.record(data)
            self.sock.sendto(b"ECHO:" + data, addr)

    def close(self) -> None:
        self.sock.close()


class Upstream(Recorder):
    """A plain HTTP server on host loopback that records request lines."""

    def __init__(self) -> None:
        super().__init__()
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rec.record(f"{self.command} {self.path}".encode())
                body = b"hello from upstream\n"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
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


def firma_cmd(*args: str) -> list[str]:
    return [sys.executable, str(DRIVE), *args]


def run_firma(args, *, cwd, env, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        firma_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A clean environment for firma (so the test does not depend on the caller's)."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LOGNAME": "firma-tester",
        "FIRMA_STATE_DIR": str(tmp / "state"),
    }
    env.update(extra)
    return env


def searchable(path: Path) -> None:
    """Let every uid search `path` and its parents up to /tmp (pytest makes them 0700): what runs
    before the sandbox as a root caller's unprivileged agent uid (a bwrap wrapper, the files it
    checks) must reach them."""
    for d in (path, *path.parents):
        if d == Path("/tmp") or d == d.parent:
            break
        d.chmod(d.stat().st_mode | 0o011)


def wrapped_bwrap_env(tmp: Path, body: str) -> dict[str, str]:
    """base_env with a `bwrap` wrapper named by `[host].bwrap` in a config file the user controls
    (FIRMA_CONFIG; firma never takes bwrap from PATH): `--version` goes to the real bwrap, then
    `body` (shell lines that may exit or exec in its place), then the call goes through."""
    real = "/usr/bin/bwrap"
    if not os.access(real, os.X_OK):
        raise AssertionError("bwrap is not installed at /usr/bin/bwrap; run scripts/install-system-deps.sh")
    searchable(tmp)  # a root caller's bwrap runs as the agent's unprivileged uid
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "bwrap"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec {real} --version\n{body}exec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = base_env(tmp)
    cfg = tmp / "host-bwrap.toml"
    cfg.write_text(f'[host]\nbwrap = "{wrapper}"\n')
    env["FIRMA_CONFIG"] = str(cfg)
    return env


def wait_for(path: Path, proc: subprocess.Popen | None = None, limit: float = 60) -> None:
    """Poll until path exists; fail early (with firma's stderr) if proc exits first."""
    end = time.monotonic() + limit
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"firma exited ({proc.returncode}) before {path.name} appeared: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def _cmdlines():
    """(pid, raw NUL-separated argv) of every host process we can read."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                yield int(pid), f.read()
        except OSError:
            continue


def pids_with_cmdline(needle: bytes) -> list[int]:
    """Host processes whose command line contains needle anywhere."""
    return [pid for pid, raw in _cmdlines() if needle in raw]


def processes_with(marker: str) -> list[int]:
    """Processes whose argv, joined by spaces, contains marker (the test runner excluded)."""
    found = []
    for pid, raw in _cmdlines():
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if marker in cmd and "pytest" not in cmd:
            found.append(pid)
    return found

def wait_for_processes(marker: str, *, present: bool, limit: float = 20) -> list[int]:
    """Poll until processes whose argv contains marker exist (present) or are all gone; return
    what is there at the end (the caller asserts on it)."""
    end = time.monotonic() + limit
    while bool(processes_with(marker)) != present and time.monotonic() < end:
        time.sleep(0.02)
    return processes_with(marker)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    return d


HELD_DRIVER = r'''
import pathlib, sys, time
import firma.backends.bwrap.backend as backend
mark, guarded = sys.argv[1], sys.argv[2] == "guarded"
plant = backend.plant
def held_plant(*a, **k):
    pathlib.Path(mark).touch()  # bwrap has built the sandbox and holds the agent
    time.sleep(30)
    return plant(*a, **k)
backend.plant = held_plant
if not guarded:  # the control: the launcher as it was before the guard
    class NoGuard:
        def watch(self, pid): pass
        def stand_down(self): pass
    backend.Guard.start = classmethod(lambda cls, *a: NoGuard())
from firma.cli.main import entry
sys.argv = ["firma", *sys.argv[3:]]
sys.exit(entry())
'''


def kill_launcher_while_held(python: list[str], env: dict, ws: Path, marks: Path, *, guarded: bool,
                             attempt: int = 0) -> tuple[bool, list[int]]:
    """Launch `sh -c 'touch ran; exec sleep N'` with a launcher (run by `python`, a command prefix
    ending in an interpreter) that stops once bwrap holds the built sandbox, SIGKILL it there,
    and say whether the agent ran and which of its processes are left (then killed). `guarded`
    False replaces the guard by one that does nothing (the control)."""
    n = 5000 + secrets.randbelow(4000)
    tag = f"{'guarded' if guarded else 'unguarded'}-{attempt}"
    mark, ran = marks / f"held-{tag}", ws / f"ran-{tag}"
    p = subprocess.Popen([*python, "-c", HELD_DRIVER, str(mark), "guarded" if guarded else "unguarded", "run", "--quiet", "--", "sh", "-c",
                          f"touch {ran}; exec sleep {n}.6"], cwd=ws, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while not mark.exists() and time.monotonic() < end and p.poll() is None:
        time.sleep(0.01)
    assert mark.exists(), "the launch never reached the held sandbox"
    p.kill()  # the launcher only: setpriv (unprivileged) execs it, so it is p itself
    p.wait(10)
    end = time.monotonic() + 3.0  # time for a released agent to start, even on a loaded machine
    while not ran.exists() and time.monotonic() < end:
        time.sleep(0.02)
    left = wait_for_processes(f"sleep {n}.6", present=ran.exists(), limit=3)
    for pid in left:  # the control leaves its agent running: end it
        os.kill(pid, signal.SIGKILL)
    return ran.exists(), left

"""A signal to firma's whole process group (timeout(1), a CI cancel, systemd stop, ^C) ends the run
the way the agent ends it: the services outlive the agent's shutdown — a request it makes while
shutting down still gets through — and the exit status is the agent's, with no [ERR]."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from linux_support import base_env, firma_cmd, require_tools


class _Upstream:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    data = c.recv(4096)
                    if data:
                        self.paths.append(data.split(b" ")[1].decode())
                        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                except OSError:
                    pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_group_signal_ends_the_run_with_the_agents_status(tmp_path, sig):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    up = _Upstream()
    name = signal.Signals(sig).name[3:]
    agent = (f"trap 'curl -s -o /dev/null -w %{{http_code}} http://127.0.0.1:{up.port}/shutdown > code; exit 5' {name}; "
             "touch ready; while :; do sleep 0.05; done")
    p = subprocess.Popen(firma_cmd("run", "--quiet", "--allow-host", f"127.0.0.1:{up.port}", "--", "sh", "-c", agent),
                         cwd=ws, env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # firma leads its own process group, as under timeout(1)
    try:
        deadline = time.monotonic() + 30
        while not (ws / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.02)
        os.killpg(p.pid, sig)  # the whole group: firma and, before this fix, its services process
        assert p.wait(30) == 5, p.stderr.read() if p.stderr else ""
        err = p.stderr.read() if p.stderr else ""
        assert "[ERR]" not in err, err
        assert (ws / "code").read_text() == "200" and up.paths == ["/shutdown"]
    finally:
        if p.poll() is None:
            p.kill()
        up.sock.close()

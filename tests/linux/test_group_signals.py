"""A signal to firma's whole process group (timeout(1), a CI cancel, systemd stop, ^C) ends the run
the way the agent ends it: the services outlive the agent's shutdown — a request it makes while
shutting down still gets through — and the exit status is the agent's, with no [ERR]."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from linux_support import Upstream, base_env, firma_cmd, require_tools


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_group_signal_ends_the_run_with_the_agents_status(tmp_path, sig):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    up = Upstream()
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
        assert (ws / "code").read_text() == "200" and up.hits == [b"GET /shutdown"]
    finally:
        if p.poll() is None:
            p.kill()
        up.close()

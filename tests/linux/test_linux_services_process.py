"""The split launch of `firma run` with bwrap (firma.run.forked): a synchronous launcher and a
services process forked from it. Through the real CLI: the services process dying mid-run
stops the agent and fails closed; the launcher's death takes the services process along; a
run whose agent sends nothing stops the services without an error; an agent that connects at
once is served (its connection waits in the planted listener's backlog); a termination signal
while bwrap builds the sandbox stops the launch."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from linux_support import (
    Upstream,
    base_env,
    firma_cmd,
    require_tools,
    run_firma,
    wait_for,
    wait_for_processes,
    wrapped_bwrap_env,
)

pytestmark = pytest.mark.confinement


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


def _services_pid(state: Path) -> int:
    """The services process's pid, from the live run's run.log."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        for log in state.glob("run/sbx_*/run.log"):
            m = re.search(r"services process pid (\d+)", log.read_text())
            if m:
                return int(m.group(1))
        time.sleep(0.02)
    raise AssertionError("no services process pid in run.log")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, limit: float = 10) -> bool:
    end = time.monotonic() + limit
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return not _alive(pid)


def test_services_process_dying_stops_the_agent_and_nothing_more_gets_out(ws, tmp_path):
    up = Upstream()
    try:
        n = 5000 + secrets.randbelow(4000)
        url = f"http://127.0.0.1:{up.port}"
        script = (
            f"curl -s -o /dev/null -w '%{{http_code}}' {url}/before > {ws}/r1; touch {ws}/started; "
            f"while :; do curl -s -m 2 -o /dev/null {url}/after; sleep 0.1; done & sleep {n}.3; wait"
        )
        p = subprocess.Popen(
            firma_cmd("run", "--allow-host", f"127.0.0.1:{up.port}", "--", "sh", "-c", script),
            cwd=ws, env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        wait_for(ws / "started", p)
        assert (ws / "r1").read_text() == "200"  # control: egress worked through the services
        assert [h for h in up.hits if b"/before" in h]
        services = _services_pid(tmp_path / "state")
        assert wait_for_processes(f"sleep {n}.3", present=True) and _alive(services)
        os.kill(services, signal.SIGKILL)
        assert p.wait(30) == 1
        err = p.stderr.read()
        assert err.startswith("[ERR]  the services process (sidecar, bridge, DNS stub) stopped unexpectedly (killed by signal 9)")
        assert err.count("\n") == 1, err
        assert wait_for_processes(f"sleep {n}.3", present=False) == []  # the agent and its background loop are gone
        up.reset()
        time.sleep(0.5)
        assert up.hits == []  # nothing arrived after the services died
        doc = json.loads(next((tmp_path / "state" / "proofs").glob("sbx_*.json")).read_text())
        assert doc["exit_status"] is None and doc["ended_at"]
        assert next((tmp_path / "state" / "proofs").glob("sbx_*.run.log")).exists()  # failed: log kept
    finally:
        up.close()


def test_killing_the_launcher_takes_the_services_process_along(ws, tmp_path):
    n = 5000 + secrets.randbelow(4000)
    p = subprocess.Popen(firma_cmd("run", "--", "sh", "-c", f"touch {ws}/started; sleep {n}.2"), cwd=ws,
                         env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(ws / "started", p)
        services = _services_pid(tmp_path / "state")
        log = next((tmp_path / "state").glob("run/sbx_*/run.log"))
        end = time.monotonic() + 30
        while "services serving" not in log.read_text() and time.monotonic() < end:
            time.sleep(0.02)
        # control: it runs while the launcher does, past its start-up (whose last step, telling
        # the launcher it serves, would fail once the launcher is gone)
        assert "services serving" in log.read_text() and _alive(services)
        p.kill()  # SIGKILL: no teardown runs; the death signal set by the services process must
        p.wait(10)
        assert _wait_gone(services)
        assert wait_for_processes(f"sleep {n}.2", present=False) == []
    finally:
        if p.poll() is None:
            p.kill()


def test_quiet_and_busy_runs_stop_their_services_without_error(ws, tmp_path):
    """An agent that sends nothing: teardown ends the services process (possibly before it
    served) and says nothing of it. An agent that sends a request at once, before the services
    process can be serving: the request waits in the backlog and is answered, audited and
    flushed by the time firma returns."""
    up = Upstream()
    try:
        log = tmp_path / "firma.log"
        q = run_firma(["--log-file", str(log), "run", "--", "true"], cwd=ws, env=base_env(tmp_path))
        assert q.returncode == 0, q.stderr
        text = log.read_text()
        assert "services process pid" in text and "proof written" in text
        assert "teardown:" not in text and "ERROR" not in text, text
        p = run_firma(
            ["--log-file", str(log), "run", "--allow-host", f"127.0.0.1:{up.port}", "--", "sh", "-c",
             f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{up.port}/first"],
            cwd=ws, env=base_env(tmp_path),
        )
        assert p.returncode == 0 and p.stdout == "200", p.stderr
        assert [h for h in up.hits if b"/first" in h]
        assert "teardown:" not in log.read_text() and "ERROR" not in log.read_text()
        with open(tmp_path / "state" / "audit.jsonl") as f:
            events = [json.loads(line) for line in f]
        assert any(e["resource"].endswith(f"127.0.0.1:{up.port}") or f":{up.port}" in e["resource"] for e in events), events
    finally:
        up.close()


def test_termination_signal_while_the_sandbox_is_being_built_stops_the_launch(ws, tmp_path):
    """A bwrap that stalls before building the sandbox: SIGTERM to firma interrupts the wait,
    kills the stalled bwrap and ends with 128+15 and no agent. Control: the same wrapper without
    the stall runs the agent."""
    n = 5000 + secrets.randbelow(4000)
    # The wrapper runs as bwrap does: as a root caller's unprivileged agent uid, which may write here.
    (tmp_path / "marks").mkdir(mode=0o777)
    (tmp_path / "marks").chmod(0o777)
    env = wrapped_bwrap_env(tmp_path, (
        f"touch {tmp_path}/marks/wrapper-ran\n"
        f"[ -e {ws}/stall ] && exec sleep {n}.6\n"  # the stalled "bwrap" is this one process
    ))
    ctl = run_firma(["run", "--", "sh", "-c", f"touch {ws}/agent-ran"], cwd=ws, env=env)
    assert ctl.returncode == 0 and (ws / "agent-ran").exists(), ctl.stderr  # control
    (ws / "agent-ran").unlink()
    (tmp_path / "marks" / "wrapper-ran").unlink()
    (ws / "stall").touch()
    proofs = tmp_path / "state" / "proofs"
    control_proofs = set(proofs.glob("sbx_*.json"))
    p = subprocess.Popen(firma_cmd("run", "--", "sh", "-c", f"touch {ws}/agent-ran"), cwd=ws, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "marks" / "wrapper-ran", p)
        assert wait_for_processes(f"sleep {n}.6", present=True)
        p.send_signal(signal.SIGTERM)
        # The signal ends the wait itself: firma is back before the 10 s after which the wait for
        # bwrap's report would have given up on its own (and said so with exit 1).
        assert p.wait(8) == 128 + signal.SIGTERM, p.stderr.read()
        assert not (ws / "agent-ran").exists()
        assert wait_for_processes(f"sleep {n}.6", present=False) == []  # the stalled bwrap was killed
        (proof,) = set(proofs.glob("sbx_*.json")) - control_proofs
        assert json.loads(proof.read_text())["exit_status"] == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()



def _curl_codes(urls: list[str]) -> str:
    return "; ".join(f"curl -s -o /dev/null -w '%{{http_code}} ' {u}" for u in urls)


def test_policy_and_monitor_reach_the_services_process(ws, tmp_path):
    """The launcher loads the policy and the services process decides with it: a Cedar forbid
    refuses one path of an allowed upstream while another path gets through; --monitor lets a
    request out that the same run without it refuses, and audits the deny it let pass. The
    upstream records what reached it."""
    up = Upstream()
    try:
        base = f"http://127.0.0.1:{up.port}"
        allow = ["--allow-host", f"127.0.0.1:{up.port}"]
        policy = tmp_path / "policy.cedar"
        policy.write_text('forbid(principal, action, resource) when { resource.path like "/admin*" };\n')
        p = run_firma(["run", *allow, "--policy", str(policy), "--", "sh", "-c", _curl_codes([f"{base}/ok", f"{base}/admin/x"])],
                      cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0 and p.stdout.split() == ["200", "403"], p.stdout + p.stderr
        assert [h for h in up.hits if b"/ok" in h] and not [h for h in up.hits if b"/admin" in h]

        ctl = run_firma(["run", "--", "sh", "-c", _curl_codes([f"{base}/watched"])], cwd=ws, env=base_env(tmp_path))
        assert ctl.stdout.split() == ["403"] and not [h for h in up.hits if b"/watched" in h]  # control
        m = run_firma(["run", "--monitor", "--", "sh", "-c", _curl_codes([f"{base}/watched"])], cwd=ws, env=base_env(tmp_path))
        assert m.stdout.split() == ["200"], m.stdout + m.stderr
        assert [h for h in up.hits if b"/watched" in h]
        with open(tmp_path / "state" / "audit.jsonl") as f:
            seen = [(e["resource"].split(str(up.port))[-1], e["decision"], e["deny_reason"]) for e in map(json.loads, f)]
        assert seen == [
            ("/ok", 1, ""),
            ("/admin/x", 2, "policy_forbid"),
            ("/watched", 2, "host_not_allowed"),  # the control
            ("/watched", 1, "monitor_mode:host_not_allowed"),  # let through, and said so
        ]
    finally:
        up.close()


def test_services_that_never_serve_stop_the_run_at_the_startup_timeout(ws, tmp_path):
    """A services process stuck before serving (here: a sitecustomize hook makes any process but
    the launcher hang in `import asyncio`) would leave the agent's connections waiting forever:
    at --sidecar-startup-timeout-secs the launcher stops the agent and says why in one line.
    Control: the same run without the hook serves and ends normally."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "LAUNCHER = os.getpid()\n"
        "class Stall:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'asyncio' and os.getpid() != LAUNCHER:\n"
        "            time.sleep(3600)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Stall())\n"
    )
    n = 5000 + secrets.randbelow(4000)
    argv = ["run", "--sidecar-startup-timeout-secs", "1", "--", "sh", "-c", f"sleep 1.5; : {n}.7"]
    ctl = run_firma(argv, cwd=ws, env=base_env(tmp_path))
    assert ctl.returncode == 0, ctl.stderr  # control: served within the timeout, ended normally
    p = run_firma(argv, cwd=ws, env=base_env(tmp_path, PYTHONPATH=str(hook)))
    assert p.returncode == 1
    assert p.stderr.startswith("[ERR]  the services process (sidecar, bridge, DNS stub) did not serve within 1s")
    assert p.stderr.count("\n") == 1, p.stderr
    assert wait_for_processes(f"{n}.7", present=False) == []
    log = next((tmp_path / "state" / "proofs").glob("sbx_*.run.log")).read_text()
    services = int(re.search(r"services process pid (\d+)", log).group(1))
    assert _wait_gone(services)



def test_a_stop_sent_before_the_services_set_their_handlers_still_stops_them(ws, tmp_path):
    """The launcher stops the services by closing a pipe, not by a signal: the services process
    discards the group signals pending at its start, and a SIGTERM from a launcher whose agent had
    already ended was discarded with them (the services served on until the 10 s kill). A
    sitecustomize hook holds the services process for 0.5 s at its first step, so the launcher's
    stop always arrives first; the hook leaves an evidence file that it held it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    evidence = tmp_path / "held"
    (hook / "sitecustomize.py").write_text(
        "import os, signal, time\n"
        "LAUNCHER = os.getpid()\n"
        "_orig = signal.set_wakeup_fd\n"
        "def _held(fd, *a, **k):\n"
        "    if fd == -1 and os.getpid() != LAUNCHER:\n"
        f"        open({str(evidence)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "        time.sleep(0.5)\n"
        "    return _orig(fd, *a, **k)\n"
        "signal.set_wakeup_fd = _held\n"
    )
    log = tmp_path / "firma.log"
    started = time.monotonic()
    p = run_firma(["--log-file", str(log), "run", "--", "true"], cwd=ws, env=base_env(tmp_path, PYTHONPATH=str(hook)))
    took = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    text = log.read_text()
    services = int(re.search(r"services process pid (\d+)", text).group(1))
    assert evidence.read_text().split() == [str(services)]  # the hook held the services process
    assert "teardown:" not in text and "ERROR" not in text, text
    assert took < 8, took  # not the 10 s kill (a bound on a failure mode, not a speed claim)

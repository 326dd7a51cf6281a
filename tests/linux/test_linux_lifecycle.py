"""Lifecycle and supervision of `firma run` (DESIGN §4, §12), through the real CLI."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linux_support import (
    HERE,
    Upstream,
    base_env,
    firma_cmd,
    processes_with,
    require_tools,
    run_firma,
    wait_for,
    kill_launcher_while_held,
    wait_for_processes,
    wrapped_bwrap_env,
)

pytestmark = pytest.mark.confinement


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


def test_exit_code_kept_and_stdout_stderr_separate(ws, tmp_path):
    p = run_firma(["run", "--quiet", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 42"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 42
    assert p.stdout == "to-out\n"
    assert p.stderr == "to-err\n"  # and none of firma's own lines
    # without --quiet the run summary follows the agent's own output, after it exited
    p = run_firma(["run", "--", "sh", "-c", "echo to-err >&2; exit 42"], cwd=ws, env=base_env(tmp_path))
    assert p.stderr.startswith("to-err\nfirma: run sbx_") and "ended with status 42" in p.stderr


def test_death_by_signal_is_128_plus_n(ws, tmp_path):
    p = run_firma(["run", "--", "sh", "-c", "kill -USR1 $$"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 128 + signal.SIGUSR1


def test_reserved_sandbox_id_refuses_to_launch(ws, tmp_path):
    env = base_env(tmp_path, FIRMA_RUN_SANDBOX_ID="sbx_inherited")
    p = run_firma(["run", "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=env)
    assert p.returncode == 1
    assert p.stderr == "[ERR]  FIRMA_RUN_SANDBOX_ID is reserved for internal child propagation; unset it\n"
    assert not (ws / "ran").exists()


def test_missing_command_is_one_line_error_not_the_agents_status(ws, tmp_path):
    # positive control: the same launch with a command that exists runs
    ok = run_firma(["run", "--", "sh", "-c", "exit 0"], cwd=ws, env=base_env(tmp_path))
    assert ok.returncode == 0
    p = run_firma(["run", "--", "no-such-command-firma-test"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr.startswith("[ERR]  command not found: no-such-command-firma-test (searched the sandbox PATH ")
    assert p.stderr.count("\n") == 1
    rel = run_firma(["run", "--", "./missing.sh"], cwd=ws, env=base_env(tmp_path))
    assert rel.stderr == "[ERR]  command not found or not executable: ./missing.sh; check the path\n"
    # nothing started: no run directory and no proof were left behind
    state = tmp_path / "state"
    assert not (state / "run").exists() or list((state / "run").iterdir()) == []
    assert len(list((state / "proofs").glob("*.json"))) == 1  # only the control run's proof


def test_command_the_sandbox_hides_is_refused_in_one_line(ws, tmp_path):
    """A command under a directory the sandbox shows empty (/tmp outside the workspace here; a
    root caller's /root, masked home paths) would only fail at bwrap's execvp: refused before
    anything starts, by path and by PATH lookup. Control: the same script in the workspace runs."""
    hidden = tmp_path / "bin"  # under /tmp, not in the workspace: a fresh tmpfs inside
    hidden.mkdir()
    for d in (hidden, ws):
        (d / "firma-test-tool").write_text("#!/bin/sh\necho tool-ran\n")
        (d / "firma-test-tool").chmod(0o755)
    ok = run_firma(["run", "--", "./firma-test-tool"], cwd=ws, env=base_env(tmp_path))
    assert ok.returncode == 0 and ok.stdout == "tool-ran\n", ok.stderr  # control
    p = run_firma(["run", "--", str(hidden / "firma-test-tool")], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (f"[ERR]  command {hidden / 'firma-test-tool'} is under /tmp, which the sandbox does not show; "
                        "install it elsewhere (e.g. /usr/local/bin) or put it in the workspace\n")
    env = base_env(tmp_path)
    env["PATH"] = f"{hidden}:{env['PATH']}"
    q = run_firma(["run", "--", "firma-test-tool"], cwd=ws, env=env)
    assert q.returncode == 1 and q.stderr.startswith("[ERR]  command not found: firma-test-tool (searched the sandbox PATH ")
    assert str(hidden) not in q.stderr  # the hidden entry is not searched
    assert len(list((tmp_path / "state" / "proofs").glob("*.json"))) == 1  # only the control ran


def test_nested_run_inside_a_sandbox_refuses(ws, tmp_path):
    # the sandbox's own environment carries FIRMA_RUN_SANDBOX_ID: a nested run must refuse
    p = run_firma(["run", "--", "sh", "-c", "echo $FIRMA_RUN_SANDBOX_ID"], cwd=ws, env=base_env(tmp_path))
    assert re.fullmatch(r"sbx_[0-9a-f]{32}\n", p.stdout)


def test_print_effective_config_does_not_launch(ws, tmp_path):
    p = run_firma(["run", "--print-effective-config", "--allow-host", "example.com", "--",
                   "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["backend"] == "bwrap" and doc["allow_hosts"] == ["example.com"]
    assert not (ws / "ran").exists()
    assert not (tmp_path / "state").exists()


def test_unknown_profile_and_backend_errors(ws, tmp_path):
    p = run_firma(["run", "--profile", "nope", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr == "[ERR]  unknown profile 'nope'; supported profiles: generic, claude-code, codex\n"
    p = run_firma(["run", "--backend", "lxc", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.stderr == "[ERR]  unsupported backend 'lxc'; expected one of: bwrap, vz, runner\n"
    p = run_firma(["run", "--backend", "vz", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.stderr == "[ERR]  unsupported backend vz on this host: VZ backend is only available on macOS hosts\n"


def test_tty_stays_a_tty(ws, tmp_path):
    master, slave = pty.openpty()
    p = subprocess.Popen(firma_cmd("run", "--", "sh", "-c", "test -t 0 && test -t 1 && test -t 2 && echo TTY-OK"),
                         cwd=ws, env=base_env(tmp_path, TERM="xterm"), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(30) == 0, out
    assert b"TTY-OK" in out, out


def _start(ws, tmp_path, script, *extra):
    return subprocess.Popen(firma_cmd("run", *extra, "--", "sh", "-c", script), cwd=ws,
                            env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigint_gives_130(ws, tmp_path):
    n = 5000 + secrets.randbelow(4000)
    p = _start(ws, tmp_path, f"touch {ws}/started; sleep {n}.4")
    wait_for(ws / "started", p)
    # Signal only once `sleep` runs: a shell that sees its child (touch) exit normally after a
    # SIGINT carries on by design (wait-and-cooperative-exit), which would test sh, not firma.
    assert wait_for_processes(f"sleep {n}.4", present=True)
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 130


def test_sigterm_ends_agent_and_background_grandchildren(ws, tmp_path):
    n = 5000 + secrets.randbelow(4000)
    marker1, marker2 = f"sleep {n}.1", f"sleep {n}.2"
    script = f"{marker1} & (setsid {marker2} &) ; touch {ws}/started; wait"
    p = _start(ws, tmp_path, script)
    wait_for(ws / "started", p)
    end = time.monotonic() + 20
    while not (processes_with(marker1) and processes_with(marker2)) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_with(marker1) and processes_with(marker2)  # positive control: they run
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert wait_for_processes(marker1, present=False) == [] and wait_for_processes(marker2, present=False) == []


def test_a_signal_the_caller_ignores_stays_ignored(ws, tmp_path):
    """`nohup firma run …`: a SIGHUP its caller ignores is neither handled nor forwarded by
    firma, and the agent inherits it ignored, so a hang-up does not end the run. Control: the
    same run without the ignore ends with 128+SIGHUP when firma gets one."""
    n = 5000 + secrets.randbelow(4000)

    def start(ignore_hup: bool, tag: str):
        script = f"grep SigIgn /proc/$$/status > {ws}/{tag}; sleep {n}.{tag[-1]}"
        hup = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hup else None
        p = subprocess.Popen(firma_cmd("run", "--", "sh", "-c", script), cwd=ws, env=base_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=hup)
        wait_for(ws / tag, p)
        assert wait_for_processes(f"sleep {n}.{tag[-1]}", present=True)
        return p, int((ws / tag).read_text().split()[1], 16) & (1 << (signal.SIGHUP - 1))

    ctl, ctl_ignored = start(False, "run1")
    ctl.send_signal(signal.SIGHUP)
    assert ctl.wait(30) == 128 + signal.SIGHUP and not ctl_ignored  # control
    p, ignored = start(True, "run2")
    try:
        assert ignored  # the agent inherited the caller's ignore
        p.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert p.poll() is None and wait_for_processes(f"sleep {n}.2", present=True)  # still running
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()


def test_second_signal_escalates_to_kill(ws, tmp_path):
    n = 5000 + secrets.randbelow(4000)
    p = _start(ws, tmp_path, f"trap '' TERM INT; sleep {n}.3 & touch {ws}/started; while :; do wait; done")
    wait_for(ws / "started", p)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.poll() is None  # the agent ignores the first one
    p.send_signal(signal.SIGTERM)
    rc = p.wait(30)
    assert rc == 128 + signal.SIGKILL
    assert wait_for_processes(f"sleep {n}.3", present=False) == []


def test_firma_log_lines_stay_off_the_terminal_but_in_run_log(ws, tmp_path):
    log = tmp_path / "firma.log"
    p = run_firma(["--log-file", str(log), "run", "--quiet", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0 and p.stderr == ""
    text = log.read_text()
    assert "backend network enforcement proof" in text and "enforced=true" in text


def test_external_sidecar_unreachable_refuses(ws, tmp_path):
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    p = run_firma(["run", "--sidecar", f"tcp://127.0.0.1:{port}", "--sidecar-startup-timeout-secs", "2",
                   "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr.startswith("[ERR]  ") and p.stderr.count("\n") == 1
    assert f"127.0.0.1:{port}" in p.stderr
    assert not (ws / "ran").exists()


def test_no_autostart_without_endpoint_refuses(ws, tmp_path):
    p = run_firma(["run", "--no-autostart", "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and "--no-autostart" in p.stderr
    assert not (ws / "ran").exists()


def _endpoint(out: Path, proc) -> str:
    toml = Path(str(out) + ".toml")
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if out.exists():
            return out.read_text().strip()
        if toml.exists():
            m = re.search(r'endpoint\s*=\s*"([^"]+)"', toml.read_text())
            if m:
                return m.group(1)
        assert proc.poll() is None, "external sidecar died"
        time.sleep(0.05)
    raise AssertionError("external sidecar never reported its endpoint")


def test_external_sidecar_killed_mid_run_stops_egress(ws, tmp_path):
    up = Upstream()
    allow = f"127.0.0.1:{up.port}"
    out = tmp_path / "sidecar.endpoint"
    env = base_env(tmp_path)
    sc = subprocess.Popen([sys.executable, str(HERE / "linux_ext_sidecar.py"), str(out), allow], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = _endpoint(out, sc)
        url = f"http://{allow}/"
        script = (
            f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {url}r1 > {ws}/r1.part; mv {ws}/r1.part {ws}/r1; "
            f"while [ ! -e {ws}/go ]; do sleep 0.05; done; "
            f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {url}r2 > {ws}/r2; exit 0"
        )
        p = _start(ws, tmp_path, script, "--sidecar", endpoint)
        wait_for(ws / "r1", p)
        assert (ws / "r1").read_text() == "200"
        sc.kill()
        sc.wait(10)
        (ws / "go").touch()
        assert p.wait(60) == 0, p.stderr.read()
        assert (ws / "r2").read_text() != "200"
        assert [h for h in up.hits if b"/r1" in h] and not [h for h in up.hits if b"/r2" in h]
        doc = json.loads(next((tmp_path / "state" / "proofs").glob("sbx_*.json")).read_text())
        assert doc["sidecar"] == {"endpoint": endpoint, "embedded": False}
    finally:
        sc.kill()
        up.close()


def test_killing_the_launcher_leaves_no_sandbox_process(ws, tmp_path):
    n = 5000 + secrets.randbelow(4000)
    p = _start(ws, tmp_path, f"sleep {n}.4 & touch {ws}/started; wait")
    try:
        wait_for(ws / "started", p)
        # The background sleep may exec only after `started` appears: wait for it to show.
        assert wait_for_processes(f"sleep {n}.4", present=True)
    finally:
        p.kill()  # SIGKILL: no teardown code runs; --die-with-parent and the PID namespace must do it
    p.wait(10)
    assert wait_for_processes(f"sleep {n}.4", present=False) == []
    # its run dir is stale (owner dead): the next run removes it, nothing is reused
    run_root = tmp_path / "state" / "run"
    stale = [d.name for d in run_root.iterdir()]
    assert len(stale) == 1 and (run_root / stale[0] / "owner").exists()
    q = run_firma(["--log-file", str(tmp_path / "l.log"), "run", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert q.returncode == 0
    assert list(run_root.iterdir()) == []
    assert f"removed stale run directory of a launcher that died: {stale[0]}" in (tmp_path / "l.log").read_text()


def test_agent_with_capabilities_is_refused_and_killed(ws, tmp_path, monkeypatch):
    """If the outside read of /proc/<agent>/status shows a capability, the launch is refused and
    the sandbox killed (the reading is faked to simulate a bwrap that failed to drop them).
    Driven in-process through the launch sequence `firma run` uses (firma.run.sequence, forked hosting)."""
    import io

    import firma.backends.bwrap.verify as bw
    from firma.core import config as cfgmod
    from firma.core.planner import RunArgs, build_plan
    from firma.errors import LaunchError
    from firma.host import detect_host
    from firma.run.sequence import run
    from firma.backends.bwrap.backend import BwrapBackend

    real = bw.read_status

    def with_caps(pid):
        st = real(pid)
        st["CapEff"] = "0000000000200000"
        return st

    monkeypatch.setattr(bw, "read_status", with_caps)
    n = 5000 + secrets.randbelow(4000)
    host = detect_host(base_env(tmp_path))
    plan = build_plan(RunArgs(command=("sh", "-c", f"sleep {n}.5")), cfgmod.EMPTY, host, cwd=str(ws),
                      unix_ms=int(time.time() * 1000), rand=os.urandom(20))
    with pytest.raises(LaunchError, match="holds privileges"):
        run(plan, host, backend=BwrapBackend(), terminal=io.StringIO())
    assert wait_for_processes(f"sleep {n}.5", present=False) == []
    doc = json.loads((tmp_path / "state" / "proofs" / f"{plan.identity.sandbox_id}.json").read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["agent_no_capabilities"]["ok"] is False and doc["exit_status"] is None
    # a failed run keeps its run.log next to the proof
    assert (tmp_path / "state" / "proofs" / f"{plan.identity.sandbox_id}.run.log").exists()


def test_two_concurrent_sandboxes_are_attributed_apart(tmp_path):
    """ATTACKS #60: two runs at once, one state root: every decision carries the right sandbox."""
    up = Upstream()
    try:
        env = base_env(tmp_path)
        procs = []
        for name in ("a", "b"):
            w = tmp_path / f"ws-{name}"
            w.mkdir()
            script = (f"for i in 1 2 3; do curl -s -m 5 -o /dev/null http://127.0.0.1:{up.port}/{name}$i; done; "
                      f"echo $FIRMA_RUN_SANDBOX_ID > {w}/sid")
            procs.append((name, w, subprocess.Popen(firma_cmd("run", "--allow-host", f"127.0.0.1:{up.port}", "--", "sh", "-c", script),
                                                    cwd=w, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        sids = {}
        for name, w, p in procs:
            assert p.wait(60) == 0, p.stderr.read()
            sids[name] = (w / "sid").read_text().strip()
        assert sids["a"] != sids["b"]
        events = [json.loads(row) for row in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
        seen = {"a": 0, "b": 0}
        for e in events:
            if e["action"] != "http.request":
                continue
            name = e["resource"].rsplit("/", 1)[1][0]
            assert e["sandbox_id"] == sids[name], e
            seen[name] += 1
        assert seen == {"a": 3, "b": 3}
        assert len([h for h in up.hits if h.startswith(b"GET /")]) == 6
    finally:
        up.close()


def test_workspace_path_with_spaces_newlines_and_dashes(tmp_path):
    """ATTACKS #41: a hostile workspace name is one argv element, never options or two paths."""
    ws = tmp_path / "a b\n--bind root -- x"
    ws.mkdir()
    p = run_firma(["run", "--", "sh", "-c", 'pwd > out; touch /probe-root 2>/dev/null; echo $? >> out'], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = (ws / "out").read_text().splitlines()
    assert lines[0] == str(tmp_path / "a b") and lines[1] == "--bind root -- x"  # pwd prints the newline verbatim
    assert lines[2] != "0" and not os.path.exists("/probe-root")


def test_config_file_discovered_and_strict(ws, tmp_path):
    (ws / ".firma").mkdir()
    cfg = ws / ".firma" / "firma.toml"
    cfg.write_text('[run]\nagent_id = "from-config"\n[run.defaults]\nenv_set = { FROM_CONFIG = "yes" }\n')
    t = run_firma(["trust"], cwd=ws, env=base_env(tmp_path))  # a project config widens only once trusted
    assert t.returncode == 0, t.stderr
    p = run_firma(["run", "--", "sh", "-c", 'echo "$FIRMA_AGENT_ID $FROM_CONFIG"'], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0 and p.stdout == "from-config yes\n", p.stderr
    cfg.write_text("[run]\nallow_host = []\n")
    p = run_firma(["run", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr == f"[ERR]  {cfg}: unknown key 'allow_host' in [run]\n"


def test_invalid_policy_refuses_before_anything_starts(ws, tmp_path):
    bad = tmp_path / "bad.cedar"
    bad.write_text("permit(principal, action, resource) when { nonsense")
    p = run_firma(["run", "--policy", str(bad), "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and p.stderr.startswith("[ERR]  ") and p.stderr.count("\n") == 1
    assert not (ws / "ran").exists()
    assert list((tmp_path / "state" / "run").iterdir()) == []


def test_external_sidecar_on_a_unix_socket(ws, tmp_path):
    up = Upstream()
    sock = tmp_path / "sc.sock"
    out = tmp_path / "sc.endpoint"
    sc = subprocess.Popen([sys.executable, str(HERE / "linux_ext_sidecar.py"), str(out), f"127.0.0.1:{up.port}",
                           "--listen", f"unix://{sock}"], env=base_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = _endpoint(out, sc)
        assert endpoint == f"unix://{sock}"
        p = run_firma(["run", "--sidecar", endpoint, "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       f"http://127.0.0.1:{up.port}/via-unix"], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0 and p.stdout == "200", p.stderr
        assert [h for h in up.hits if b"/via-unix" in h]
    finally:
        sc.kill()
        up.close()


def test_run_dir_removed_unless_keep_markers(ws, tmp_path):
    p = run_firma(["run", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0 and list((tmp_path / "state" / "run").iterdir()) == []
    p = run_firma(["run", "--", "true"], cwd=ws, env=base_env(tmp_path, FIRMA_RUN_KEEP_MARKERS="1"))
    kept = list((tmp_path / "state" / "run").iterdir())
    assert p.returncode == 0 and len(kept) == 1
    assert {"run.log", "resolv.conf", "passwd", "group", "hosts", "owner"} <= {f.name for f in kept[0].iterdir()}
    assert oct(kept[0].stat().st_mode & 0o777) == "0o700"
    assert "agent exited with status 0" in (kept[0] / "run.log").read_text()


def test_bwrap_refused_by_the_host_is_one_line_with_the_way_out(ws, tmp_path):
    """ATTACKS #52: where the host blocks what bwrap needs (AppArmor's userns restriction, a
    container's seccomp), bwrap fails before building the sandbox; firma never runs the command
    unsandboxed and its one line points at `firma doctor`. Simulated with a bwrap that fails as
    bwrap does there. Control: the same wrapper passing through runs the agent."""
    env = wrapped_bwrap_env(
        tmp_path, f'if [ -e {ws}/refuse ]; then echo "bwrap: setting up uid map: Permission denied" >&2; exit 1; fi\n'
    )
    cmd = ["run", "--", "sh", "-c", f"touch {ws}/agent-ran"]
    ctl = run_firma(cmd, cwd=ws, env=env)
    assert ctl.returncode == 0 and (ws / "agent-ran").exists(), ctl.stderr  # control
    (ws / "agent-ran").unlink()
    (ws / "refuse").touch()
    p = run_firma(cmd, cwd=ws, env=env)
    assert p.returncode == 1 and not (ws / "agent-ran").exists()
    bwrap_line, err = p.stderr.splitlines()
    assert bwrap_line == "bwrap: setting up uid map: Permission denied"
    assert err.startswith("[ERR]  bwrap failed before the sandbox started") and err.endswith("run `firma doctor` for the fix")


def test_a_script_whose_interpreter_the_sandbox_hides_is_refused_in_one_line(ws, tmp_path):
    """A venv made with an interpreter under a hidden directory: the script in the workspace is
    visible, its `#!` interpreter (directly, or through `env NAME` on PATH, or a symlink to it) is
    not. Refused before anything starts, naming the hidden path. Control: the same script with a
    visible interpreter runs."""
    hidden = tmp_path / "pyenv" / "bin"  # under /tmp: a fresh tmpfs inside
    hidden.mkdir(parents=True)
    (hidden / "python3").symlink_to("/usr/bin/python3")
    (ws / "venv-bin").mkdir()
    (ws / "venv-bin" / "python").symlink_to(hidden / "python3")  # the venv's link to a hidden python
    scripts = {
        "direct": f"#!{hidden / 'python3'}\nprint('ran')\n",
        "through-venv-link": f"#!{ws / 'venv-bin' / 'python'}\nprint('ran')\n",
        "env": "#!/usr/bin/env firma-hidden-python\nprint('ran')\n",
        "control": "#!/usr/bin/python3\nprint('ran')\n",
    }
    (hidden / "firma-hidden-python").symlink_to("/usr/bin/python3")
    for name, text in scripts.items():
        (ws / name).write_text(text)
        (ws / name).chmod(0o755)
    env = base_env(tmp_path)
    env["PATH"] = f"{env['PATH']}:{hidden}"
    ok = run_firma(["run", "--quiet", "--", "./control"], cwd=ws, env=env)
    assert ok.returncode == 0 and ok.stdout == "ran\n", ok.stderr
    for name in ("direct", "through-venv-link", "env"):
        p = run_firma(["run", "--", f"./{name}"], cwd=ws, env=env)
        assert p.returncode == 1 and p.stdout == "", (name, p.stderr)
        assert p.stderr.startswith(f"[ERR]  command ./{name} runs through ") and p.stderr.count("\n") == 1, p.stderr
        assert "which the sandbox does not show" in p.stderr and "/tmp" in p.stderr


def test_a_launcher_killed_while_it_holds_the_sandbox_leaves_nothing_and_nothing_runs(ws, tmp_path):
    """SIGKILL to the launcher while bwrap holds the built sandbox (the agent not released yet):
    the agent never runs and no sandbox process is left. Control: without the guard, bwrap's
    namespace init outlives the launcher, reads the release pipe's end as the release and runs
    the agent unsupervised."""
    env = base_env(tmp_path)
    ran, left = kill_launcher_while_held([sys.executable], env, ws, tmp_path, guarded=True)
    assert not ran and left == [], (ran, left)
    # control: without the guard the agent is released (not every time: a kill during bwrap's own
    # setup can take the sandbox down with it, so up to five tries)
    assert any(all(kill_launcher_while_held([sys.executable], env, ws, tmp_path, guarded=False, attempt=k))
               for k in range(5)), "control: without the guard the agent should have been released"

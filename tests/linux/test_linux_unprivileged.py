"""`firma run` as an unprivileged user: planting (port 53 included) works without root, the
confinement holds, the agent holds no capability.

/root is 0700 here and firma's venv lives under it, so the test copies firma's source, the
needed site-packages and the test helpers into a world-readable temp dir and runs them with the
system /usr/bin/python3.11 as a dedicated test user. If the user cannot be created the test
FAILS (it never skips)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
import socket
import subprocess

import pytest

from linux_support import HERE, SYSTEM_PYTHON, StreamRecorder, UdpRecorder, Upstream, kill_launcher_while_held, require_tools
from unprivileged_support import PY, make_install, remove_install

pytestmark = [pytest.mark.confinement, pytest.mark.unprivileged]

@pytest.fixture(scope="module")
def install():
    require_tools()
    inst = make_install("firma-unpriv-", extra_tree=HERE)
    yield inst
    remove_install(inst)


def as_user(inst, argv, cwd, timeout=120):
    return subprocess.run(inst.argv(*argv), cwd=cwd, env=inst.env(), capture_output=True, text=True,
                          timeout=timeout)


def test_unprivileged_user_run(install):
    u = install.user
    ws = install.root / "ws"
    ws.mkdir()
    os.chown(ws, u.pw_uid, u.pw_gid)
    tcp = StreamRecorder(socket.AF_INET, ("127.0.0.1", 0))
    udp = UdpRecorder()
    up = Upstream()
    try:
        cfg = {
            "tcp_port": tcp.addr[1], "udp_port": udp.port, "direct_url": f"http://127.0.0.1:{up.port}/direct",
            "unix_paths": [], "abstract_name": "firma-test-none", "dns_name": "localhost", "host_pid": os.getpid(),
            "secret_file": "/etc/shadow", "leak_var": "PYTHONPATH", "results": str(ws / "outside.json"),
            "allowed_url": None, "etc_write": "/etc/firma-probe-unpriv",
        }
        (ws / "outside.cfg").write_text(json.dumps(cfg))
        # /tmp is a fresh tmpfs inside the sandbox: the probe must live in the workspace.
        shutil.copy(install.root / "tests" / "linux_probe.py", ws / "probe.py")
        probe = str(ws / "probe.py")
        p = as_user(install, [SYSTEM_PYTHON, probe, str(ws / "outside.cfg")], ws)
        assert p.returncode == 0, p.stderr
        outside = json.loads((ws / "outside.json").read_text())
        assert outside["tcp_python"]["ok"] and tcp.hits and udp.hits  # positive control, same user
        assert outside["status"]["Uid"].split()[0] == str(u.pw_uid)
        tcp.reset(), udp.reset(), up.reset()

        inside_cfg = {**cfg, "dns_name": "exfil.attacker.invalid", "results": str(ws / "inside.json"),
                      "allowed_url": f"http://127.0.0.1:{up.port}/allowed", "denied_url": "http://denied.example.com/"}
        (ws / "inside.cfg").write_text(json.dumps(inside_cfg))
        drive = str(install.root / "tests" / "linux_drive.py")
        p = as_user(install, [PY, drive, "run", "--allow-host", f"127.0.0.1:{up.port}", "--proof-file",
                              str(ws / "proof.json"), "--", SYSTEM_PYTHON, probe, str(ws / "inside.cfg")], ws)
        assert p.returncode == 0, p.stderr
        inside = json.loads((ws / "inside.json").read_text())
        assert inside["inside"] is True
        assert not inside["tcp_python"]["ok"] and not inside["udp_python"]["ok"]
        assert inside["env_i_child"]["rc"] != 0 and inside["bash_dev_tcp"]["rc"] != 0
        assert tcp.hits == [] and udp.hits == []
        assert inside["allowed"]["out"].endswith("200") and any(b"/allowed" in h for h in up.hits)
        assert inside["denied"]["out"].startswith("HTTP/1.1 403")
        assert "status: REFUSED" in inside["dig"]["out"] and "SERVER: 127.0.0.1#53" in inside["dig"]["out"]
        assert inside["host_pid_visible"] is False
        assert inside["leak_var"] is None
        assert inside["status"]["CapEff"] == "0000000000000000" and inside["status"]["NoNewPrivs"] == "1"
        doc = json.loads((ws / "proof.json").read_text())
        checks = {c["name"]: c for c in doc["checks"]}
        assert checks["agent_no_capabilities"]["ok"] and checks["netns_only_loopback"]["ok"]
        assert checks["resolv_conf_points_at_stub"]["ok"]
        assert "/root" not in checks["masked_paths"]["detail"]  # root-only masks are for root callers
        assert os.stat(ws / "proof.json").st_uid == u.pw_uid
    finally:
        tcp.close(), udp.close(), up.close()


CREDENTIAL_STORES = (
    ".git-credentials", ".config/gh/hosts.yml", ".npmrc", ".pypirc", ".cargo/credentials.toml",
    ".docker/config.json", ".aws/credentials", ".config/gcloud/credentials.db", ".kube/config",
    ".terraform.d/credentials.tfrc.json", ".bash_history", ".zsh_history", ".netrc", ".ssh/id_ed25519",
)


def test_credential_stores_are_unreadable_inside_for_a_non_root_caller(install):
    """Each store is readable by the same user outside (the control) and unreadable inside. The
    home lives under /home: a home under /tmp would be hidden inside whole (a fresh tmpfs), and
    the test could not fail."""
    u = install.user
    home = Path(tempfile.mkdtemp(prefix="firma-creds-", dir="/home"))
    os.chown(home, u.pw_uid, u.pw_gid)
    home.chmod(0o755)
    ws = install.root / "ws-creds"
    ws.mkdir()
    os.chown(ws, u.pw_uid, u.pw_gid)
    env = install.env(HOME=str(home))
    try:
        for rel in CREDENTIAL_STORES:
            path = home / rel
            for parent in reversed(path.relative_to(home).parents[:-1]):
                d = home / parent
                if not d.exists():
                    d.mkdir(mode=0o700)
                    os.chown(d, u.pw_uid, u.pw_gid)
            path.write_text(f"secret-{rel}\n")
            path.chmod(0o600)
            os.chown(path, u.pw_uid, u.pw_gid)
        script = "; ".join(
            f'cat "$HOME/{rel}" >/dev/null 2>&1 && echo "{rel}=read" || echo "{rel}=denied"' for rel in CREDENTIAL_STORES
        )
        outside = subprocess.run(install.argv("sh", "-c", script), cwd=ws, env=env, capture_output=True, text=True, timeout=60)
        assert outside.stdout.split() == [f"{rel}=read" for rel in CREDENTIAL_STORES], outside.stdout + outside.stderr
        drive = str(install.root / "tests" / "linux_drive.py")
        inside = subprocess.run(install.argv(PY, drive, "run", "--", "sh", "-c", script), cwd=ws, env=env,
                                capture_output=True, text=True, timeout=120)
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout.split() == [f"{rel}=denied" for rel in CREDENTIAL_STORES], inside.stdout
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(ws, ignore_errors=True)


def test_unprivileged_launcher_killed_while_it_holds_the_sandbox_leaves_nothing(install):
    """As for root (test_linux_lifecycle): SIGKILL to an unprivileged caller's launcher while bwrap
    holds the sandbox runs nothing and leaves nothing; without the guard (control) the agent runs."""
    u = install.user
    ws = install.root / "ws-held"
    ws.mkdir()
    os.chown(ws, u.pw_uid, u.pw_gid)
    python, env = install.argv(PY), install.env()
    ran, left = kill_launcher_while_held(python, env, ws, ws, guarded=True)
    assert not ran and left == [], (ran, left)
    # control: without the guard the agent is released (up to five tries, as for root)
    assert any(all(kill_launcher_while_held(python, env, ws, ws, guarded=False, attempt=k)) for k in range(5)), \
        "control: without the guard the agent should have been released"

"""`firma run` as an unprivileged user: planting (port 53 included) works without root, the
confinement holds, the agent holds no capability.

/root is 0700 here and firma's venv lives under it, so the test copies firma's source, the
needed site-packages and the test helpers into a world-readable temp dir and runs them with the
system /usr/bin/python3.11 as a dedicated test user. If the user cannot be created the test
FAILS (it never skips)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from linux_support import HERE, SYSTEM_PYTHON, StreamRecorder, UdpRecorder, Upstream, require_tools

pytestmark = [pytest.mark.confinement, pytest.mark.unprivileged]

USER = "firma-test"
PY = "/usr/bin/python3.11"
PACKAGES = ("cedarpy", "cryptography", "cffi", "pyseccomp.py", "idna")


def ensure_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.fail("the unprivileged-user test must be started as root (it creates the test user)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    p = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot create test user {USER}: {p.stderr.strip()}")
    return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def install():
    require_tools()
    if not os.access(PY, os.X_OK):
        pytest.fail(f"{PY} is needed to run firma as an unprivileged user")
    user = ensure_user()
    root = Path(tempfile.mkdtemp(prefix="firma-unpriv-"))
    os.chmod(root, 0o755)
    import firma

    src = Path(firma.__file__).resolve().parent
    shutil.copytree(src, root / "lib" / "firma", ignore=shutil.ignore_patterns("__pycache__"))
    site = Path(firma.__file__).resolve().parents[2] / ".venv" / "lib" / "python3.11" / "site-packages"
    import cedarpy

    site = Path(cedarpy.__file__).resolve().parents[1]
    for name in PACKAGES:
        s = site / name
        (shutil.copytree if s.is_dir() else shutil.copy)(s, root / "lib" / name)
    for so in site.glob("_cffi_backend*.so"):
        shutil.copy(so, root / "lib" / so.name)
    shutil.copytree(HERE, root / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    home = root / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    yield {"root": root, "user": user, "home": home}
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(f"/tmp/firma-{user.pw_uid}", ignore_errors=True)


def as_user(inst, argv, cwd, timeout=120):
    u = inst["user"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(inst["home"]),
        "LANG": "C.UTF-8",
        "LOGNAME": USER,
        "PYTHONPATH": f"{inst['root']}/lib",
    }
    return subprocess.run(
        ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--inh-caps=-all", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_unprivileged_user_run(install):
    u = install["user"]
    ws = install["root"] / "ws"
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
        shutil.copy(install["root"] / "tests" / "linux_probe.py", ws / "probe.py")
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
        drive = str(install["root"] / "tests" / "linux_drive.py")
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

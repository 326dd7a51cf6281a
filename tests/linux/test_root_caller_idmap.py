"""A root caller's agent runs as an unprivileged host uid (DESIGN §5.1): the workspace is an
idmapped clone, so the agent still edits, creates, renames and deletes the caller's files and
commits with git, what it creates is the caller's on the host, and root-only files and
/proc/sys refuse it by their modes. Controls: root outside reads and writes the same things."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from firma.core.bwrap_plan import ROOT_CALLER_AGENT_ID
from linux_support import SYSTEM_PYTHON, base_env, firma_cmd, require_tools, run_firma

pytestmark = pytest.mark.confinement
GIT = "git -c user.name=t -c user.email=t@example.invalid"


@pytest.fixture(autouse=True)
def _root():
    require_tools()
    if os.geteuid() != 0:
        pytest.fail("these tests describe a root caller; CI runs as root")


def _proof(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(path.read_text())


def test_the_agent_works_on_the_callers_files_as_an_unprivileged_uid(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    (ws / "edit.txt").write_text("before\n")
    (ws / "rename.txt").write_text("r\n")
    (ws / "delete.txt").write_text("d\n")
    (ws / "private.txt").write_text("root only\n")
    os.chmod(ws / "private.txt", 0o600)  # root's own 0600 file: still the agent's through the idmap
    script = (
        "set -e; echo after >> edit.txt; cat private.txt >/dev/null; echo new > created.txt; "
        "mkdir -p sub/dir && echo deep > sub/dir/f; mv rename.txt renamed.txt; rm delete.txt; "
        f"{GIT} add -A && {GIT} commit -qm inside; id -u; stat -c %u created.txt"
    )
    p = run_firma(["run", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    inside_uid, inside_owner = p.stdout.split()
    assert inside_uid == inside_owner != "0"  # inside: the agent's own files, not root's
    assert (ws / "edit.txt").read_text() == "before\nafter\n"
    assert not (ws / "rename.txt").exists() and (ws / "renamed.txt").exists() and not (ws / "delete.txt").exists()
    for rel in ("created.txt", "sub", "sub/dir", "sub/dir/f", ".git/index"):
        st = (ws / rel).lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), rel  # the caller's on the host
    log = subprocess.run(["git", "-C", str(ws), "log", "--format=%s"], capture_output=True, text=True, check=True)
    assert log.stdout == "inside\n"
    check = {c["name"]: c for c in _proof(tmp_path)["checks"]}["agent_host_uid"]
    assert check["ok"] and f"host uid {ROOT_CALLER_AGENT_ID}/" in check["detail"], check


def test_root_only_files_and_sysctls_refuse_the_agent_by_their_modes(tmp_path):
    """A root-only file the masks do not know about: only the agent's uid protects it. Control:
    root outside reads it and writes the sysctl (restored)."""
    secret = Path(f"/etc/firma-test-secret-{secrets.token_hex(4)}")
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    sysctl = Path("/proc/sys/kernel/printk_ratelimit_burst")
    original = sysctl.read_text()
    try:
        assert secret.read_text() == "s3cret\n"  # control
        sysctl.write_text(original)  # control: root outside may write it
        ws = tmp_path / "ws"
        ws.mkdir()
        probe = (
            "import errno, sys\n"
            "def tryit(f):\n"
            "    try:\n"
            "        f(); return 'ok'\n"
            "    except OSError as e:\n"
            "        return errno.errorcode[e.errno]\n"
            f"print(tryit(lambda: open({str(secret)!r}).read()))\n"
            "print(tryit(lambda: open('/etc/shadow-').read()))\n"
            f"print(tryit(lambda: open({str(sysctl)!r}, 'w').write('1')))\n"
        )
        p = run_firma(["run", "--", SYSTEM_PYTHON, "-S", "-c", probe], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0, p.stderr
        secret_read, shadow_read, sysctl_write = p.stdout.split()
        assert secret_read == "EACCES"
        assert shadow_read in ("EACCES", "ENOENT") or shadow_read == "ok" and not Path("/etc/shadow-").exists()
        assert sysctl_write in ("EACCES", "EROFS")
        assert sysctl.read_text() == original
    finally:
        secret.unlink()
        sysctl.write_text(original)


def test_a_workspace_behind_an_unsearchable_parent_is_refused_in_one_line(tmp_path):
    base = Path(f"/home/firma-test-{secrets.token_hex(4)}")
    base.mkdir(mode=0o700)
    try:
        ws = base / "ws"
        ws.mkdir()
        cmd = ["run", "--", "sh", "-c", "touch ran"]
        p = run_firma(cmd, cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 1 and not (ws / "ran").exists()
        assert p.stderr.startswith("[ERR]  ") and p.stderr.count("\n") == 1, p.stderr
        assert f"{base} cannot be searched" in p.stderr and f"chmod o+x {base}" in p.stderr
        base.chmod(0o711)  # control: the fix it names
        p = run_firma(cmd, cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0 and (ws / "ran").exists(), p.stderr
    finally:
        shutil.rmtree(base)


def test_root_without_cap_sys_admin_is_refused_in_one_line(tmp_path):
    """As in a default container: root, but no CAP_SYS_ADMIN. firma cannot give the agent an
    unprivileged uid, so it refuses and says to run as a normal user; the command never runs."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop CAP_SYS_ADMIN")
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = [setpriv, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--",
            *firma_cmd("run", "--", "sh", "-c", "touch ran")]
    p = subprocess.run(argv, cwd=ws, env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and not (ws / "ran").exists(), p.stderr
    assert p.stderr.startswith("[ERR]  ") and p.stderr.count("\n") == 1, p.stderr
    assert "without CAP_SYS_ADMIN" in p.stderr and "run firma as a normal (non-root) user instead" in p.stderr

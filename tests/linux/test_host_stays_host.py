"""The host stays the host: global kernel interfaces under /proc are read-only inside, for a root
caller too (with root as the owner of the sandbox's user namespace, a writable /proc/sys let an
agent set a sysctl such as kernel.core_pattern and run its own program as host root), and neither
$HOME nor a system directory is ever the writable workspace."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from linux_support import SYSTEM_PYTHON, base_env, require_tools, run_firma

pytestmark = pytest.mark.confinement

SYSCTL = "/proc/sys/kernel/printk_ratelimit_burst"


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


def _write(value: str) -> str:
    return f"echo {value} > {SYSCTL} 2>/dev/null && echo write=ok || echo write=fail; cat {SYSCTL}"


def test_proc_sys_is_read_only_inside_for_a_root_caller(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the control (a sysctl write as root outside) needs root; CI runs as root")
    ws = tmp_path / "ws"
    ws.mkdir()
    original = Path(SYSCTL).read_text().strip()
    probe_value = str(int(original) + 1)
    try:
        # control: root outside writes the sysctl
        Path(SYSCTL).write_text(probe_value)
        assert Path(SYSCTL).read_text().strip() == probe_value
        Path(SYSCTL).write_text(original)

        p = run_firma(["run", "--", "sh", "-c", _write(probe_value)], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0, p.stderr
        lines = p.stdout.split()
        assert lines[0] == "write=fail", p.stdout
        assert lines[1] == original  # still readable inside
        assert Path(SYSCTL).read_text().strip() == original  # and unchanged on the host
    finally:
        Path(SYSCTL).write_text(original)

    proof = json.loads(next((tmp_path / "state" / "proofs").glob("sbx_*.json")).read_text())
    checks = {c["name"]: c for c in proof["checks"]}
    check = checks["kernel_interfaces_read_only"]
    assert check["ok"] is True and "/proc/sys" in check["detail"], check


def test_home_as_the_workspace_is_refused_before_anything_starts(tmp_path):
    """`firma run` from $HOME would let the agent write ~/.local/bin, ~/.config/autostart and shell
    rc files; from a project directory under it (the control) the same command runs."""
    env = base_env(tmp_path)
    home = Path(env["HOME"])
    marker = "touch \"$HOME/.agent-was-here\""
    p = run_firma(["run", "--", "sh", "-c", marker], cwd=home, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("[ERR]") and "it is your home directory" in err[0], p.stderr
    assert not (tmp_path / "state").exists()  # nothing was started or written
    proj = home / "proj"
    proj.mkdir()
    p = run_firma(["run", "--", "sh", "-c", "echo ran"], cwd=proj, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ran", p.stderr
    assert not (home / ".agent-was-here").exists()


ROOT_ONLY = ("/etc/shadow-", "/etc/gshadow-", "/var/cache/debconf/passwords.dat", "/etc/ssl/private")


def test_root_only_secrets_are_hidden_from_a_root_callers_agent(tmp_path):
    """Host root owns a root caller's sandbox, so modes do not stop its agent: the backups of the
    password files, debconf's stored passwords and the TLS private keys are masked. Control: root
    outside reads each one that exists here."""
    if os.geteuid() != 0:
        pytest.fail("the control (reading root-only files outside) needs root; CI runs as root")
    present = [p for p in ROOT_ONLY if os.path.exists(p)]
    if not present:
        pytest.fail("none of the root-only files exist on this host; the test would prove nothing")
    script = "; ".join(
        f'(test -d {p} && ls -A {p} | grep -q . || test -s {p} && head -c1 {p} >/dev/null) 2>/dev/null '
        f'&& echo "{p}=visible" || echo "{p}=hidden"' for p in present
    )
    outside = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    seen_outside = dict(line.split("=") for line in outside.stdout.split())
    visible_outside = [p for p in present if seen_outside.get(p) == "visible"]
    assert visible_outside, outside.stdout  # control: at least one holds data root can read
    ws = tmp_path / "ws"
    ws.mkdir()
    p = run_firma(["run", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    seen_inside = dict(line.split("=") for line in p.stdout.split())
    assert all(seen_inside[q] == "hidden" for q in visible_outside), (visible_outside, p.stdout)


SETID_ATTEMPTS = (
    "cp /bin/true chmod-u && chmod 4755 chmod-u",
    "cp /bin/true chmod-g && chmod g+s chmod-g",
    "install -m 4755 /bin/true install-u",
    f"{SYSTEM_PYTHON} -c \"import os; os.close(os.open('open-u', os.O_CREAT | os.O_WRONLY, 0o4755))\"",
    "cp /bin/true ordinary && chmod 755 ordinary",  # control: an ordinary mode goes through
)


def _setid_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID))


def test_no_setuid_or_setgid_file_reaches_the_host(tmp_path):
    """A setuid file the agent leaves in the workspace stays on the host (setuid-root when firma
    runs as root). Control: the same commands outside leave exactly those files set-id."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for cmd in SETID_ATTEMPTS:
        subprocess.run(["sh", "-c", cmd], cwd=outside, check=True, timeout=30)
    assert _setid_files(outside) == ["chmod-g", "chmod-u", "install-u", "open-u"]
    ws = tmp_path / "ws"
    ws.mkdir()
    script = "; ".join(f"({cmd}) 2>/dev/null; echo $?" for cmd in SETID_ATTEMPTS)
    p = run_firma(["run", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    statuses = p.stdout.split()
    assert all(s != "0" for s in statuses[:-1]) and statuses[-1] == "0", p.stdout
    assert _setid_files(ws) == []
    assert (ws / "ordinary").stat().st_mode & 0o777 == 0o755


def test_mask_paths_hide_what_the_user_lists(tmp_path):
    """`[run].mask_paths`: an absolute file and a `~/` directory are empty inside; control: the
    same reads outside see the content. An entry that would hide the workspace is refused."""
    env = base_env(tmp_path)
    home = Path(env["HOME"])
    (home / "vault").mkdir()
    (home / "vault" / "token").write_text("home-secret\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "key").write_text("abs-secret\n")
    cfg = tmp_path / "firma.toml"
    cfg.write_text(f'[run]\nmask_paths = ["{other}/key", "~/vault"]\n')
    ws = home / "proj"
    ws.mkdir()
    script = f"cat {other}/key ~/vault/token 2>&1; ls -A ~/vault | wc -l"
    outside = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert "abs-secret" in outside.stdout and "home-secret" in outside.stdout  # control
    p = run_firma(["--config", str(cfg), "run", "--", "sh", "-c", script], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    assert "secret" not in p.stdout and p.stdout.split()[-1] == "0", p.stdout
    cfg.write_text(f'[run]\nmask_paths = ["{home}"]\n')
    p = run_firma(["--config", str(cfg), "run", "--", "true"], cwd=ws, env=env)
    assert p.returncode == 1 and "would hide the workspace" in p.stderr, p.stderr

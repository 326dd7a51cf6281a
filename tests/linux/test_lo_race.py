"""The `lo` race end to end (ATTACKS: a sandbox reported before its network exists): a bwrap
stand-in named by `[host].bwrap` reports the sandbox at once but lets its child set up the
network namespace (`lo`) only 0.6 s later. firma must wait for `lo` before planting and run the
agent normally. Control: the same launch with the wait disabled fails to plant."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from linux_support import HERE, base_env, require_tools, searchable


def _setup(tmp_path: Path) -> dict[str, str]:
    searchable(tmp_path)  # a root caller's bwrap runs as the agent's unprivileged uid
    wrapper = tmp_path / "bwrap-late-lo"
    shutil.copy(HERE / "bwrap_late_lo.py", wrapper)
    wrapper.chmod(0o755)
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    evidence.chmod(0o1777)
    cfg = tmp_path / "late-lo.toml"
    cfg.write_text(f'[host]\nbwrap = "{wrapper}"\n')
    env = base_env(tmp_path)
    env["FIRMA_CONFIG"] = str(cfg)
    env["LATE_LO_EVIDENCE"] = str(evidence / "released")
    return env


def _firma(args: list[str], env: dict[str, str], cwd: Path, wait: bool) -> subprocess.CompletedProcess:
    prelude = "" if wait else "import firma.backends.bwrap.planting as p; p._LOOPBACK_WAIT = 0\n"
    code = prelude + "import sys\nfrom firma.cli.main import entry\nsys.exit(entry())\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_planting_waits_for_a_late_loopback(tmp_path):
    require_tools()
    env = _setup(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    p = _firma(["run", "--quiet", "--", "sh", "-c", "grep -c . /proc/net/if_inet6 >/dev/null; echo agent-ran"],
               env, ws, wait=True)
    assert p.returncode == 0 and p.stdout.strip() == "agent-ran", p.stderr
    released = (tmp_path / "evidence" / "released").read_text()
    assert released.startswith("released 0.6"), released  # the sandbox was reported before lo existed
    # control: without the wait the same late loopback makes planting fail, and nothing runs
    os.unlink(tmp_path / "evidence" / "released")
    p = _firma(["run", "--quiet", "--", "sh", "-c", "echo agent-ran"], env, ws, wait=False)
    assert p.returncode == 1 and "could not plant sockets" in p.stderr and "agent-ran" not in p.stdout, p.stderr

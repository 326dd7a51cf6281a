"""The post-run scanner (firma.run.workspace_check) on temp trees: what the sandbox cannot let
the agent do for real (setuid files, file capabilities) and the reading rules (no symlink
followed, pre-existing content not reported, bounds)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from firma.core import workspace_findings as wf
from firma.core.model import Identity, RunPlan
from firma.run import workspace_check as wc

GIT_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]


def plan(ws: Path, home: Path | None = None, writable: tuple[str, ...] = ()) -> RunPlan:
    return RunPlan(identity=Identity("sbx_1", "s", "generic", "a", "u"), backend="bwrap", argv=("x",),
                   cwd=str(ws), home=str(home or ws.parent / "home"), state_root="/nonexistent",
                   writable_home_paths=writable)


def baseline(tmp: Path, p: RunPlan) -> wc.Baseline:
    run_dir = tmp / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    return wc.take_baseline(p, str(run_dir))


def kinds(result: wc.ScanResult) -> set[tuple[str, str]]:
    return {(f.kind, f.path) for f in result.findings}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_ID, *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    return d


def test_setuid_setgid_world_writable_and_capability(tmp_path: Path, ws: Path):
    p = plan(ws)
    b = baseline(tmp_path, p)
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("open", 0o666), ("plain", 0o644)):
        f = ws / name
        f.write_text("x")
        os.chmod(f, mode)
    cap = ws / "cap"
    cap.write_text("x")
    # vfs_cap_data revision 2: magic, then permitted/inheritable for two 32-bit words (CAP_NET_RAW).
    try:
        os.setxattr(cap, "security.capability", struct.pack("<IIIII", 0x02000000, 1 << 13, 0, 0, 0))
    except OSError as exc:
        pytest.fail(f"cannot set a file capability here ({exc}); the test runs as root on a filesystem with xattrs")
    got = kinds(wc.scan(p, b))
    assert got == {(wf.SETUID, f"{ws}/suid"), (wf.SETUID, f"{ws}/sgid"), (wf.WORLD_WRITABLE, f"{ws}/open"),
                   (wf.CAPABILITY, f"{ws}/cap")}


def test_pre_existing_is_not_reported_but_a_chmod_is(tmp_path: Path, ws: Path):
    old = ws / "old"
    old.write_text("x")
    os.chmod(old, 0o4755)
    (ws / ".envrc").write_text("echo hi\n")
    p = plan(ws)
    b = baseline(tmp_path, p)
    assert wc.scan(p, b).findings == ()
    os.chmod(ws / ".envrc", 0o644)  # any change of the inode makes it new (ctime)
    assert kinds(wc.scan(p, b)) == {(wf.TOOL_CONFIG, f"{ws}/.envrc")}


def test_symlinks_are_never_followed(tmp_path: Path, ws: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    p = plan(ws)
    b = baseline(tmp_path, p)
    # A new setuid file and a git dir outside, reachable only through links the agent planted.
    (outside / "suid").write_text("x")
    os.chmod(outside / "suid", 0o4755)
    (outside / "HEAD").write_text("ref: refs/heads/main\n")
    (outside / "config").write_text("[core]\n\tfsmonitor = /evil\n")
    (ws / "link").symlink_to(outside)
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").write_text(f"gitdir: {ws}/link\n")
    got = kinds(wc.scan(p, b))
    assert got == set(), got


def test_gitlink_new_in_index_reaches_a_pre_existing_nested_config(tmp_path: Path, ws: Path):
    git(ws, "init", "-q")
    (ws / "f").write_text("x")
    git(ws, "add", "f")
    git(ws, "commit", "-qm", "x")
    sub = ws / "sub"
    sub.mkdir()
    git(sub, "init", "-q")
    (sub / "g").write_text("y")
    git(sub, "add", "g")
    git(sub, "commit", "-qm", "y")
    git(sub, "config", "core.fsmonitor", "/evil.sh")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=sub, env=GIT_ENV, capture_output=True, text=True).stdout.strip()
    p = plan(ws)
    b = baseline(tmp_path, p)
    assert b.index_copy is not None and os.stat(b.index_copy).st_mode & 0o777 == 0o600
    assert wc.scan(p, b).findings == ()  # the user's own nested repo, not in the index
    git(ws, "update-index", "--add", "--cacheinfo", f"160000,{head},sub")
    (found,) = wc.scan(p, b).findings
    assert found.path == f"{sub}/.git/config" and "reachable through the new gitlink sub" in found.detail


def test_include_and_hooks_path_of_a_new_config(tmp_path: Path, ws: Path):
    p = plan(ws)
    b = baseline(tmp_path, p)
    gd = ws / "n" / ".git"
    (gd / "hooks").mkdir(parents=True)
    (gd / "HEAD").write_text("ref: refs/heads/main\n")
    (gd / "config").write_text("[include]\n\tpath = ../inc\n[core]\n\thooksPath = myhooks\n")
    (ws / "n" / "inc").write_text("[diff \"x\"]\n\ttextconv = /evil\n")
    (ws / "n" / "myhooks").mkdir()
    (ws / "n" / "myhooks" / "pre-commit").write_text("#!/bin/sh\n")
    (gd / "hooks" / "pre-push.sample").write_text("#!/bin/sh\n")
    (gd / "objects").mkdir()
    (gd / "objects" / "suid").write_text("x")  # object storage is skipped
    os.chmod(gd / "objects" / "suid", 0o4755)
    got = kinds(wc.scan(p, b))
    assert got == {(wf.GIT_CONFIG, f"{gd}/config"), (wf.GIT_CONFIG, f"{ws}/n/inc"),
                   (wf.GIT_HOOK, f"{ws}/n/myhooks/pre-commit")}, got


def test_unreadable_new_index_is_a_finding(tmp_path: Path, ws: Path):
    (ws / ".git").mkdir()
    p = plan(ws)
    b = baseline(tmp_path, p)
    (ws / ".git" / "index").write_bytes(b"DIRC\x00\x00\x00\x09junk")
    assert kinds(wc.scan(p, b)) == {(wf.GIT_INDEX, f"{ws}/.git/index")}


def test_home_settings_new_hooks_and_mcp_servers(tmp_path: Path, ws: Path):
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text('{"hooks": {"Stop": [{"command": "mine"}]}}')
    (home / ".claude.json").write_text('{"mcpServers": {}}')
    p = plan(ws, home, (".claude", ".claude.json"))
    b = baseline(tmp_path, p)
    assert wc.scan(p, b).findings == ()
    (home / ".claude" / "settings.json").write_text('{"hooks": {"Stop": [{"command": "mine"}], "PreToolUse": [1]}}')
    (home / ".claude.json").write_text('{"mcpServers": {"evil": {"command": "sh"}}}')
    (home / ".claude" / "link.json").symlink_to(tmp_path / "elsewhere.json")
    got = {(f.path, f.detail.split(" ")[0]) for f in wc.scan(p, b).findings}
    assert got == {(f"{home}/.claude/settings.json", "hooks.PreToolUse"), (f"{home}/.claude.json", "mcpServers.evil")}


def test_bounds_make_an_incomplete_finding(tmp_path: Path, ws: Path):
    for i in range(20):
        (ws / f"f{i}").write_text("x")
    deep = ws
    for _ in range(5):
        deep = deep / "d"
    deep.mkdir(parents=True)
    p = plan(ws)
    b = baseline(tmp_path, p)
    r = wc.scan(p, b, wc.Limits(max_entries=10))
    assert [f.kind for f in r.findings] == [wf.INCOMPLETE]
    r = wc.scan(p, b, wc.Limits(max_depth=3))
    assert [f.kind for f in r.findings] == [wf.INCOMPLETE] and "depth" in r.findings[0].detail

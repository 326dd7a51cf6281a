"""Persistence and config tampering inside the read-write workspace (ATTACKS #38, #36).

Git hooks/config, editor and MCP config and firma's own project config run code or set policy
*outside* the sandbox the next time the user runs git, opens the editor or runs firma: inside
the sandbox they are read-only mounts, their parent directories are pinned mount points (so they
cannot be renamed away and replaced), and a symlinked protected name refuses the launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from firma.core import bwrap_plan, config as cfgmod
from firma.core.model import ExecutionEnvelope, Identity, IdentityMode, NetworkEndpoints, RunPlan, SeccompPolicyRef, frozen_map
from firma.core.planner import RunArgs, build_plan
from firma.errors import ConfigError, LaunchError
from firma.core.hostfacts import Host
from linux_support import SYSTEM_PYTHON, base_env, require_tools, run_firma

WS = "/work/p"

# --- the plan as data -------------------------------------------------------------------------


def envelope(**kw) -> ExecutionEnvelope:
    base = dict(
        sandbox_id="sbx_1", runtime_dir="/st/run/sbx_1", executable="agent", args=(), cwd=WS,
        env=frozen_map({"PATH": "/usr/bin"}), identity_mode=IdentityMode.SANDBOX_USER, home="/home/u",
        seccomp_filter_path=None, mounts=(), mask_home_paths=(".ssh",),
        network=NetworkEndpoints("http://127.0.0.1:18080", "127.0.0.1:53"),
    )
    base.update(kw)
    return ExecutionEnvelope(**base)


def facts(ws_kinds: dict[str, str]) -> bwrap_plan.BwrapFacts:
    kinds = {"/tmp": "dir", "/run": "dir", "/home/u/.ssh": "dir", "/st": "dir"}
    kinds.update({f"{WS}/{k}": v for k, v in ws_kinds.items()})
    return bwrap_plan.BwrapFacts(caller_uid=1000, caller_gid=1000, kinds=frozen_map(kinds), state_root="/st")


def binds(argv, flag):
    return [(i, argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


REPO = {".git": "dir", ".git/hooks": "dir", ".git/config": "file", ".git/info": "dir",
        ".firma": "dir", ".firma/firma.toml": "file", ".mcp.json": "file", "src": "dir"}


def test_plan_binds_protected_paths_read_only_after_the_workspace():
    p = bwrap_plan.build(envelope(), facts(REPO))
    a = p.argv
    ws_bind = next(i for i, s, t in binds(a, "--bind") if t == WS)
    ro = {t: i for i, s, t in binds(a, "--ro-bind") if t.startswith(WS + "/")}
    assert set(ro) == {f"{WS}/.git/hooks", f"{WS}/.git/config", f"{WS}/.git/info", f"{WS}/.firma", f"{WS}/.mcp.json"}
    assert all(a[i + 1] == a[i + 2] for i in ro.values())  # bound onto itself, no other source
    pins = {t: i for i, s, t in binds(a, "--bind") if t != WS}
    assert set(pins) == {f"{WS}/.git"}  # the .git dir stays writable, but cannot be renamed away
    # Order: workspace, then the pin of .git, then the read-only binds under it, then home masks.
    assert ws_bind < pins[f"{WS}/.git"] < min(ro.values())
    assert max(ro.values()) < a.index("/home/u/.ssh")
    assert f"{WS}/.git" not in ro and f"{WS}/src" not in ro and f"{WS}/.firma/firma.toml" not in ro
    assert {f"{WS}/.gitmodules", f"{WS}/.vscode", f"{WS}/.claude", f"{WS}/.bashrc"} <= set(p.protection.absent)
    assert not set(p.protection.absent) & set(ro)
    # Negative control: without the facts there is nothing to bind (absent paths are never created).
    bare = bwrap_plan.build(envelope(), facts({}))
    assert not [t for _, _, t in binds(bare.argv, "--ro-bind") if t.startswith(WS + "/")]


def test_plan_protects_a_worktree_gitdir_file_itself():
    p = bwrap_plan.build(envelope(), facts({".git": "file"}))
    assert p.protection.read_only == (f"{WS}/.git",) and p.protection.pinned == ()
    assert (f"{WS}/.git", f"{WS}/.git") in [(s, t) for _, s, t in binds(p.argv, "--ro-bind")]


@pytest.mark.parametrize("link", [".git/hooks", ".git", ".firma", ".mcp.json", "docs"])
def test_plan_refuses_a_symlinked_protected_name(link):
    kinds = dict(REPO, docs="dir", **{"docs/x": "file"})
    kinds[link] = "symlink"
    with pytest.raises(LaunchError, match=rf"^protected workspace path {WS}/{link} is a symlink"):
        bwrap_plan.build(envelope(), facts(kinds), protected_extra=(f"{WS}/docs/x",))
    bwrap_plan.build(envelope(), facts(dict(REPO, docs="dir", **{"docs/x": "file"})),
                     protected_extra=(f"{WS}/docs/x",))  # control: real dirs pass


def test_plan_user_paths_nest_without_reexposing_anything():
    kinds = dict(REPO, a="dir", **{"a/b": "dir", "a/b/c.txt": "file"})
    extra = (f"{WS}/.git", f"{WS}/a/b/c.txt", "/elsewhere/x", WS)
    p = bwrap_plan.build(envelope(), facts(kinds), protected_extra=extra)
    # .git itself is read-only now: nothing under it is pinned (a writable bind would re-expose it).
    assert f"{WS}/.git" in p.protection.read_only and f"{WS}/.git/hooks" not in p.protection.read_only
    assert p.protection.pinned == (f"{WS}/a", f"{WS}/a/b")
    a = p.argv
    order = [t for _, _, t in sorted(binds(a, "--bind") + binds(a, "--ro-bind")) if t.startswith(WS + "/")]
    assert order.index(f"{WS}/a") < order.index(f"{WS}/a/b") < order.index(f"{WS}/a/b/c.txt")
    assert "/elsewhere/x" not in a


def test_git_config_refs_name_hooks_path_and_includes():
    text = (
        '[core]\n\trepositoryformatversion = 0\n\thooksPath = ".husky/_" # husky\n'
        '[include]\n  path = ../shared.gitconfig\n[includeIf "gitdir:/x/"]\n  path = ~/mine\n'
        '[Core] HooksPath=githooks\n[remote "origin"]\n  path = not-an-include\n'
    )
    hooks, includes = bwrap_plan.git_config_refs(text, f"{WS}/.git", WS)
    assert hooks == (f"{WS}/.husky/_", f"{WS}/githooks")
    assert includes == (f"{WS}/shared.gitconfig",)
    f = facts(dict(REPO, githooks="dir"))
    f = bwrap_plan.BwrapFacts(**{**f.__dict__, "git_refs": hooks})
    p = bwrap_plan.build(envelope(), f)
    assert f"{WS}/githooks" in p.protection.read_only and f"{WS}/.husky/_" in p.protection.absent


def test_candidate_paths_cover_every_component():
    c = bwrap_plan.candidate_paths(envelope(), None, (f"{WS}/a/b/c",))
    assert {f"{WS}/.git", f"{WS}/.git/hooks", f"{WS}/a", f"{WS}/a/b", f"{WS}/a/b/c"} <= set(c)


def test_run_plan_adds_config_policy_and_user_paths_inside_the_workspace():
    ident = Identity("sbx_1", "s", "generic", "a", "u")
    plan = RunPlan(identity=ident, backend="bwrap", argv=("x",), cwd=WS, home="/home/u", state_root="/st",
                   policy_path=f"{WS}/policy/p.cedar", config_path="/etc/firma.toml",
                   seccomp_policy=SeccompPolicyRef(f"{WS}/sec.json", "/var/art"),
                   protected_paths=("notes/todo.md", "."))
    assert bwrap_plan.plan_protected(plan) == (f"{WS}/policy/p.cedar", f"{WS}/sec.json", f"{WS}/notes/todo.md")


@pytest.mark.parametrize("entry", ["/etc/passwd", "../up", "a/../../b", "."])
def test_config_rejects_absolute_or_dotdot_protected_paths(entry):
    with pytest.raises(ConfigError, match=r"^/p/.firma/firma.toml: run.protected_paths entries must be relative"):
        cfgmod.parse(f'[run]\nprotected_paths = ["{entry}"]\n', "/p/.firma/firma.toml")


def test_config_protected_paths_reach_the_run_plan():
    cfg = cfgmod.parse('[run]\nprotected_paths = ["notes/./todo.md", "Makefile"]\n', f"{WS}/.firma/firma.toml")
    h = Host(system="linux", uid=1000, gid=1000, bwrap_path="/usr/bin/bwrap", bwrap_version="bubblewrap 0.8.0",
             environ={"HOME": "/home/u", "PATH": "/usr/bin"})
    plan = build_plan(RunArgs(command=("agent",)), cfg, h, cwd=WS, unix_ms=1_700_000_000_000, rand=bytes(20))
    assert plan.protected_paths == ("notes/todo.md", "Makefile")


# --- real sandboxes ----------------------------------------------------------------------------

PROBE = r"""
import errno, json, os, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def write(path, mode="w"):
    with open(path, mode) as f:
        f.write("#!/bin/sh\ntouch /tmp/pwned\n")
for p in sys.argv[2:]:
    attempt("write:" + p, lambda p=p: write(p, "a"))
attempt("rename:.git", lambda: os.rename(".git", ".git-moved"))
attempt("control", lambda: write("ordinary.txt"))
out["mountinfo"] = open("/proc/self/mountinfo").read()
json.dump(out, open(sys.argv[1], "w"))
"""

TARGETS = (".git/hooks/pre-commit", ".git/config", ".firma/firma.toml", ".vscode/tasks.json", ".mcp.json",
           ".claude/settings.json", ".git/modules/sub/config", ".cargo/config.toml", ".npmrc", ".envrc",
           ".devcontainer/devcontainer.json", ".cursor/mcp.json")
# tool configs that exist at launch (a submodule's git dir, cargo, npm, direnv, devcontainer, cursor)
TOOL_CONFIGS = (".git/modules/sub/config", ".cargo/config.toml", ".npmrc", ".envrc",
                ".devcontainer/devcontainer.json", ".cursor/mcp.json")


def make_repo(ws: Path, toml: str = "[run]\n") -> None:
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    (ws / ".firma").mkdir()
    (ws / ".firma" / "firma.toml").write_text(toml)
    (ws / ".vscode").mkdir()
    (ws / ".vscode" / "tasks.json").write_text("{}\n")
    (ws / ".mcp.json").write_text("{}\n")
    (ws / ".claude").mkdir()
    (ws / ".claude" / "settings.json").write_text("{}\n")
    for rel in TOOL_CONFIGS:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("# harmless\n")


def snapshot(ws: Path, rels) -> dict[str, bytes | None]:
    return {r: (ws / r).read_bytes() if (ws / r).exists() else None for r in rels}


def ro_mounts(mountinfo: str) -> dict[str, bool]:
    top = {}
    for line in mountinfo.splitlines():
        f = line.split()
        top[f[4]] = "ro" in f[5].split(",")
    return top


def probe(ws: Path, tmp_path: Path, targets, name="evidence.json"):
    require_tools()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    shutil.copy(script, ws / "probe.py")  # /tmp is a fresh tmpfs inside: run it from the workspace
    evidence = ws / name
    proof = tmp_path / "proof.json"
    p = run_firma(["run", "--proof-file", str(proof), "--", SYSTEM_PYTHON, "probe.py", str(evidence), *targets],
                  cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    return json.loads(evidence.read_text()), json.loads(proof.read_text())


def test_protected_files_are_read_only_inside_and_unchanged_on_the_host(ws, tmp_path):
    make_repo(ws)
    before = snapshot(ws, TARGETS)
    assert before[".git/hooks/pre-commit"] is None  # git init ships only *.sample hooks
    out, proof = probe(ws, tmp_path, TARGETS)
    for t in TARGETS:
        assert out["write:" + t] == "EROFS", (t, out["write:" + t])
    assert out["rename:.git"] == "EBUSY"  # .git is pinned: no swapping in a copy with planted hooks
    assert snapshot(ws, TARGETS) == before and (ws / ".git").is_dir()
    # control: an ordinary workspace file is writable and reaches the host
    assert out["control"] == "ok" and (ws / "ordinary.txt").read_text().startswith("#!/bin/sh")
    # the final mount table inside the sandbox: read-only mount points at exactly those paths
    top = ro_mounts(out["mountinfo"])
    for rel in (".git/hooks", ".git/config", ".git/info", ".firma", ".vscode", ".mcp.json", ".claude",
                ".git/modules", ".cargo", ".npmrc", ".envrc", ".devcontainer", ".cursor"):
        assert top.get(f"{ws}/{rel}") is True, rel
    assert top[str(ws)] is False and top[f"{ws}/.git"] is False
    check = next(c for c in proof["checks"] if c["name"] == "workspace_protected_paths")
    assert check["ok"] and f"{ws}/.git/hooks" in check["detail"] and f"{ws}/.firma" in check["detail"]
    # control outside the sandbox, on a copy: the same writes succeed
    copy = tmp_path / "copy"
    shutil.copytree(ws, copy, symlinks=True)
    for t in TARGETS:
        with open(copy / t, "a") as f:
            f.write("x")
    os.rename(copy / ".git", copy / ".git-moved")


def test_git_still_commits_inside_but_cannot_set_config(ws, tmp_path):
    require_tools()
    make_repo(ws)
    (ws / "a.txt").write_text("a\n")
    ident = "-c user.name=t -c user.email=t@example.invalid"
    cmd = f"git {ident} add a.txt && git {ident} commit -qm inside && git config core.fsmonitor 'touch pwned'"
    p = run_firma(["run", "--", "sh", "-c", cmd], cwd=ws, env=base_env(tmp_path))
    assert p.returncode != 0 and "could not write config file" in p.stderr
    log = subprocess.run(["git", "-C", str(ws), "log", "--format=%s"], capture_output=True, text=True)
    assert log.stdout == "inside\n"  # control: normal git work goes through
    got = subprocess.run(["git", "-C", str(ws), "config", "--get", "core.fsmonitor"], capture_output=True, text=True)
    assert got.returncode == 1 and got.stdout == ""


def test_symlinked_git_hooks_refuses_the_launch(ws, tmp_path):
    require_tools()
    make_repo(ws)
    outside = tmp_path / "outside-hooks"
    shutil.move(ws / ".git" / "hooks", outside)
    os.symlink(outside, ws / ".git" / "hooks")
    p = run_firma(["run", "--", "sh", "-c", "touch ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr == (f"[ERR]  protected workspace path {ws}/.git/hooks is a symlink (it could point outside "
                        "the sandbox); replace it with the real directory or file, then rerun\n")
    assert not (ws / "ran").exists()
    # control: with a real directory again the same command runs
    os.unlink(ws / ".git" / "hooks")
    shutil.move(outside, ws / ".git" / "hooks")
    ok = run_firma(["run", "--", "sh", "-c", "touch ran"], cwd=ws, env=base_env(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert (ws / "ran").exists()


def test_user_protected_path_is_read_only(ws, tmp_path):
    make_repo(ws, '[run]\nprotected_paths = ["deploy/prod.env"]\n')
    (ws / "deploy").mkdir()
    (ws / "deploy" / "prod.env").write_text("A=1\n")
    (ws / "deploy" / "dev.env").write_text("A=2\n")
    out, proof = probe(ws, tmp_path, ("deploy/prod.env", "deploy/dev.env"))
    assert out["write:deploy/prod.env"] == "EROFS"
    assert (ws / "deploy" / "prod.env").read_text() == "A=1\n"
    assert out["write:deploy/dev.env"] == "ok"  # control: the unlisted sibling stays writable
    assert (ws / "deploy" / "dev.env").read_text().startswith("A=2\n#!/bin/sh")
    top = ro_mounts(out["mountinfo"])
    assert top[f"{ws}/deploy/prod.env"] is True and top[f"{ws}/deploy"] is False  # parent pinned, writable
    check = next(c for c in proof["checks"] if c["name"] == "workspace_protected_paths")
    assert f"{ws}/deploy/prod.env" in check["detail"]


def test_hooks_path_and_included_config_from_git_config_are_read_only(ws, tmp_path):
    make_repo(ws)
    (ws / "githooks").mkdir()
    (ws / "githooks" / "pre-commit").write_text("#!/bin/sh\n")
    (ws / "shared.gitconfig").write_text("[user]\n\tname = t\n")
    subprocess.run(["git", "-C", str(ws), "config", "core.hooksPath", "githooks"], check=True)
    subprocess.run(["git", "-C", str(ws), "config", "include.path", "../shared.gitconfig"], check=True)
    targets = ("githooks/pre-commit", "shared.gitconfig", "README")
    (ws / "README").write_text("r\n")
    before = snapshot(ws, targets[:2])
    out, proof = probe(ws, tmp_path, targets)
    assert out["write:githooks/pre-commit"] == "EROFS" and out["write:shared.gitconfig"] == "EROFS"
    assert snapshot(ws, targets[:2]) == before
    assert out["write:README"] == "ok"  # control: an unreferenced file stays writable
    check = next(c for c in proof["checks"] if c["name"] == "workspace_protected_paths")
    assert f"{ws}/githooks" in check["detail"] and f"{ws}/shared.gitconfig" in check["detail"]


def test_worktree_gitdir_file_is_read_only(ws, tmp_path):
    require_tools()
    (ws / ".git").write_text("gitdir: /somewhere/else\n")
    p = run_firma(["run", "--", "sh", "-c", "echo 'gitdir: /tmp/evil' > .git; echo ok > plain"],
                  cwd=ws, env=base_env(tmp_path))
    assert "Read-only file system" in p.stderr
    assert (ws / ".git").read_text() == "gitdir: /somewhere/else\n"
    assert (ws / "plain").read_text() == "ok\n"  # control


def test_launch_verification_reads_the_final_mount_table_and_refuses_gaps():
    """The backend checks the plan against a real mountinfo (here: this process's, where /proc
    is a read-write mount and /not/a/mount is none): a protected path that is not a read-only
    mount point, or a pinned parent that is not a mount point, refuses the launch."""
    import types

    from firma.backends.bwrap.verify import mount_table, verify_protected

    checks = []
    hooks = types.SimpleNamespace(add_check=checks.append)
    top = mount_table(os.getpid())  # this process's own mount table
    ok = types.SimpleNamespace(masked=(), protection=bwrap_plan.Protection((), ("/proc",), (), ()))
    verify_protected(top, ok, hooks.add_check)
    assert checks[-1].name == "workspace_protected_paths" and checks[-1].ok
    for prot in (bwrap_plan.Protection(("/proc",), (), (), ()), bwrap_plan.Protection((), ("/not/a/mount",), (), ())):
        bad = types.SimpleNamespace(masked=(), protection=prot)
        with pytest.raises(LaunchError, match="not mounted read-only as planned"):
            verify_protected(top, bad, hooks.add_check)
        assert not checks[-1].ok and "NOT protected" in checks[-1].detail
    # A home mask inside the workspace (cwd = $HOME) hides a protected path even more: accepted.
    later = types.SimpleNamespace(masked=("/tmp", "/home/u/.aws"),
                                  protection=bwrap_plan.Protection(("/home/u/.aws/config",), (), (), (), "/home/u"))
    verify_protected(top, later, hooks.add_check)
    assert checks[-1].ok
    # ...but a mask the workspace was bound over (/tmp) hides nothing of it: refused.
    under_tmp = types.SimpleNamespace(masked=("/tmp",),
                                      protection=bwrap_plan.Protection(("/tmp/ws/.git/config",), (), (), (), "/tmp/ws"))
    with pytest.raises(LaunchError, match="not mounted read-only as planned: /tmp/ws/.git/config"):
        verify_protected(top, under_tmp, hooks.add_check)

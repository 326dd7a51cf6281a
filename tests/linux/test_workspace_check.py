"""The post-run workspace check, for real (DESIGN §13a): the agent plants what the protected
paths cannot cover — paths that did not exist at launch — and the run reports each one and exits
3. Each trap is then sprung on purpose by the test (`git status`, `cargo check`) with a marker
command, proving it would have run on the host and that the report is what protects the user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from linux_support import base_env, require_tools, run_firma

GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
CARGO = shutil.which("cargo") or "/root/.cargo/bin/cargo"
# The agent's git: the same identity, no network anywhere (every repository here is local).
AGENT_PRELUDE = 'set -e\nG() { git -c user.name=t -c user.email=t@example.invalid "$@"; }\n'


def host_env(tmp: Path) -> dict[str, str]:
    """The user's later shell: no system git config, a clean home."""
    env = base_env(tmp)
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def git(ws: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *GIT_ID, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A workspace that is a git repository with one commit (.git/config, hooks, index exist)."""
    require_tools()
    if shutil.which("git") is None:
        pytest.fail("the workspace check tests need git; run scripts/install-system-deps.sh")
    ws = tmp_path / "ws"
    ws.mkdir()
    env = host_env(tmp_path)
    for args in (["init", "-q"], ["add", "-A"]):
        assert git(ws, *args, env=env).returncode == 0
    (ws / "README").write_text("hello\n")
    assert git(ws, "add", "README", env=env).returncode == 0
    assert git(ws, "commit", "-qm", "init", env=env).returncode == 0
    return ws


def agent(ws: Path, tmp: Path, script: str, *extra: str, env: dict[str, str] | None = None):
    (tmp / "agent.sh").write_text(AGENT_PRELUDE + script)
    shutil.copy(tmp / "agent.sh", ws / ".agent.sh")
    p = run_firma(["run", *extra, "--", "bash", ".agent.sh"], cwd=ws, env=env or host_env(tmp))
    os.unlink(ws / ".agent.sh")
    return p


def marker_script(ws: Path, name: str, marker: Path, *, then_exec: bool = False) -> str:
    """Agent lines writing an executable `name` that touches `marker` (a host path outside the
    workspace: inside the sandbox it would land on a throwaway tmpfs)."""
    tail = '\\nexec "$@"' if then_exec else ""
    return f"printf '#!/bin/sh\\ntouch {marker}{tail}\\n' > {name}; chmod +x {name}\n"


NESTED_REPO = """mkdir sub; cd sub; git init -q; echo a > f; git add f; G commit -qm x
H=$(git rev-parse HEAD)
git config core.fsmonitor "{ws}/evil.sh"
cd ..; git update-index --add --cacheinfo "160000,$H,sub"
"""

SUBMODULE_GITDIR = """mkdir -p .git/modules; git init -q --separate-git-dir=.git/modules/sub2 sub2
cd sub2; echo a > f; git add f; G commit -qm x; H=$(git rev-parse HEAD)
git config core.fsmonitor "{ws}/evil.sh"
cd ..
printf '[submodule "sub2"]\\n\\tpath = sub2\\n\\turl = ./sub2\\n' > .gitmodules
git update-index --add --cacheinfo "160000,$H,sub2"
"""


def assert_reported(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "firma: the agent left" in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


def test_nested_repo_with_fsmonitor_behind_a_new_gitlink_is_reported(repo: Path, tmp_path: Path):
    marker = tmp_path / "fsmonitor-ran"
    p = agent(repo, tmp_path, marker_script(repo, "evil.sh", marker) + NESTED_REPO.format(ws=repo))
    assert_reported(p, f"[git-config] {repo}/sub/.git/config: core.fsmonitor", "remove: delete the core.fsmonitor line")
    assert not marker.exists()  # the check itself ran nothing
    # The trap is real: the user's next `git status` runs the agent's command.
    git(repo, "status", env=host_env(tmp_path))
    assert marker.exists(), "git status did not run the planted fsmonitor: the attack premise is wrong"


def test_submodule_git_dir_with_fsmonitor_is_reported(repo: Path, tmp_path: Path):
    marker = tmp_path / "submodule-fsmonitor-ran"
    p = agent(repo, tmp_path, marker_script(repo, "evil.sh", marker) + SUBMODULE_GITDIR.format(ws=repo))
    assert_reported(
        p,
        f"[git-config] {repo}/.git/modules/sub2/config: core.fsmonitor",
        f"[tool-config] {repo}/.gitmodules",
    )
    git(repo, "status", env=host_env(tmp_path))
    assert marker.exists(), "git status did not run the submodule's fsmonitor: the attack premise is wrong"


def test_cargo_rustc_wrapper_is_reported(repo: Path, tmp_path: Path):
    if not os.access(CARGO, os.X_OK):
        pytest.fail(f"this test needs cargo ({CARGO} is missing); run scripts/install-system-deps.sh")
    (repo / "Cargo.toml").write_text('[package]\nname = "tiny"\nversion = "0.1.0"\nedition = "2021"\n')
    (repo / "src").mkdir()
    (repo / "src" / "main.rs").write_text("fn main() {}\n")
    marker = tmp_path / "rustc-wrapper-ran"
    script = marker_script(repo, "wrap.sh", marker, then_exec=True) + (
        f"mkdir .cargo; printf '[build]\\nrustc-wrapper = \"{repo}/wrap.sh\"\\n' > .cargo/config.toml\n"
    )
    p = agent(repo, tmp_path, script)
    assert_reported(p, f"[tool-config] {repo}/.cargo/config.toml", f"rm {repo}/.cargo/config.toml")
    env = host_env(tmp_path)
    env.update(HOME="/root", CARGO_TARGET_DIR=str(tmp_path / "target"),
               PATH=f"{os.path.dirname(CARGO)}:{env['PATH']}")
    r = subprocess.run([CARGO, "check", "--offline", "-q"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert marker.exists(), f"cargo check did not run the planted rustc-wrapper: {r.stderr}"


def test_a_failing_agent_keeps_its_status(repo: Path, tmp_path: Path):
    p = agent(repo, tmp_path, marker_script(repo, "evil.sh", tmp_path / "m") + NESTED_REPO.format(ws=repo) + "exit 5\n")
    assert p.returncode == 5, p.stderr
    assert f"[git-config] {repo}/sub/.git/config" in p.stderr


def test_warn_reports_and_keeps_status_zero(repo: Path, tmp_path: Path):
    cfg = tmp_path / "firma.toml"
    cfg.write_text('[run]\non_workspace_findings = "warn"\n')
    env = host_env(tmp_path)
    env["FIRMA_CONFIG"] = str(cfg)
    proof = tmp_path / "proof.json"
    p = agent(repo, tmp_path, marker_script(repo, "evil.sh", tmp_path / "m") + NESTED_REPO.format(ws=repo),
              "--proof-file", str(proof), env=env)
    assert p.returncode == 0, p.stderr
    assert "on_workspace_findings = \"warn\"" in p.stderr and f"{repo}/sub/.git/config" in p.stderr
    doc = json.loads(proof.read_text())
    check = next(c for c in doc["checks"] if c["name"] == "workspace_findings")
    assert check["ok"] is False and "git-config" in check["detail"]
    assert [f["path"] for f in doc["workspace_findings"]] == [f"{repo}/sub/.git/config"]
    assert doc["exit_status"] == 0


def test_ordinary_edits_report_nothing(repo: Path, tmp_path: Path):
    proof = tmp_path / "proof.json"
    p = agent(repo, tmp_path, "echo more >> README; mkdir -p lib/deep; echo 'x = 1' > lib/deep/a.py\n"
              "G add README lib; G status --short >/dev/null\n", "--proof-file", str(proof))
    assert p.returncode == 0, p.stderr
    assert "firma: the agent left" not in p.stderr and "workspace" not in p.stderr, p.stderr
    doc = json.loads(proof.read_text())
    assert doc["workspace_findings"] == []
    assert next(c for c in doc["checks"] if c["name"] == "workspace_findings")["ok"] is True


def test_pre_existing_configs_are_not_reported(repo: Path, tmp_path: Path):
    """What the user had before the run (a nested repo with fsmonitor behind a gitlink, a cargo
    wrapper, a hook) is theirs: untouched, it is not reported."""
    env = host_env(tmp_path)
    sub = repo / "sub"
    sub.mkdir()
    assert git(sub, "init", "-q", env=env).returncode == 0
    (sub / "f").write_text("a\n")
    git(sub, "add", "f", env=env)
    assert git(sub, "commit", "-qm", "x", env=env).returncode == 0
    head = git(sub, "rev-parse", "HEAD", env=env).stdout.strip()
    assert git(sub, "config", "core.fsmonitor", "/bin/true", env=env).returncode == 0
    assert git(repo, "update-index", "--add", "--cacheinfo", f"160000,{head},sub", env=env).returncode == 0
    (repo / ".cargo").mkdir()
    (repo / ".cargo" / "config.toml").write_text('[build]\nrustc-wrapper = "/bin/true"\n')
    hook = sub / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    p = agent(repo, tmp_path, "echo more >> README; G add README\n")
    assert p.returncode == 0, p.stderr
    assert "firma: the agent left" not in p.stderr, p.stderr
    # Negative control: the same nested config, changed by the agent, is reported.
    p = agent(repo, tmp_path, "git -C sub config core.fsmonitor /bin/false\n")
    assert_reported(p, f"[git-config] {sub}/.git/config: core.fsmonitor")


def test_world_writable_and_new_hook_are_reported(repo: Path, tmp_path: Path):
    script = ("mkdir open; chmod 777 open; echo x > open/f; chmod 666 open/f\n"
              "mkdir n; cd n; git init -q; printf '#!/bin/sh\\n' > .git/hooks/post-checkout; chmod +x .git/hooks/post-checkout\n")
    p = agent(repo, tmp_path, script)
    assert_reported(
        p,
        f"[world-writable] {repo}/open: new world-writable directory -- remove: chmod o-w {repo}/open",
        f"[world-writable] {repo}/open/f: new world-writable file",
        f"[git-hook] {repo}/n/.git/hooks/post-checkout",
    )
    assert ".sample" not in p.stderr

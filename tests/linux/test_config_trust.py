"""Policy comes only from the user (DESIGN §15): a project config in the workspace widens nothing
until `firma trust`, any change withdraws the trust, a config others could have written is never
read, and what a run writes into `.firma/` does not change the next run."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import threading
from pathlib import Path

import pytest

from linux_support import base_env, require_tools, run_firma

SECRET = "s3cr3t-from-the-callers-env"

# Each widening key, a value for it, and how the effective plan shows it honoured.
WIDENING = {
    "allow_hosts": ('["evil.example"]', lambda plan: "evil.example" in plan["allow_hosts"]),
    "mounts": ('[{source = "/usr/share", target = "/mnt/hostshare"}]', lambda plan: any(m["target"] == "/mnt/hostshare" for m in plan["mounts"])),
    "env_passthrough": ('["HOME", "PATH", "GITHUB_TOKEN"]', lambda plan: "GITHUB_TOKEN" in plan["env"]),  # value redacted
    "env_set": ('{ LD_PRELOAD = "/tmp/evil.so" }', lambda plan: plan["env"].get("LD_PRELOAD") == "/tmp/evil.so"),
    "mask_home_paths": ("[]", lambda plan: ".ssh" not in plan["mask_home_paths"]),
    "policy": ('"permit.cedar"', lambda plan: (plan["policy"] or "").endswith("permit.cedar")),
    "sidecar_endpoint": ('"tcp://127.0.0.1:9"', lambda plan: plan["sidecar"]["endpoint"] == "tcp://127.0.0.1:9"),
    "seccomp_policy": ('{ source_policy_path = "sc.toml", artifact_dir = "sc" }', lambda plan: plan["seccomp_policy"] is not None),
}


def _env(tmp_path: Path) -> dict[str, str]:
    env = base_env(tmp_path)
    env["GITHUB_TOKEN"] = SECRET
    return env


def _plan(ws: Path, env, *extra) -> tuple[dict, str]:
    p = run_firma(["run", *extra, "--print-effective-config", "--", "true"], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def _project(ws: Path, text: str) -> Path:
    (ws / ".firma").mkdir(exist_ok=True)
    cfg = ws / ".firma" / "firma.toml"
    cfg.write_text(text)
    (ws / ".firma" / "permit.cedar").write_text("permit(principal, action, resource);\n")
    return cfg


@pytest.mark.parametrize("key", sorted(WIDENING))
def test_each_widening_key_waits_for_firma_trust(key, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    value, honoured = WIDENING[key]
    cfg = _project(ws, f"[run]\n{key} = {value}\n")
    plan, err = _plan(ws, env)
    assert not honoured(plan), plan  # untrusted: ignored ...
    assert err.startswith("[WARN] project config") and f"ignored {key};" in err and "firma trust" in err  # ... and said
    src = plan["config_sources"][0]
    assert src["trusted"] is False and src["ignored_keys"] == [key]

    t = run_firma(["trust"], cwd=ws, env=env)
    assert t.returncode == 0 and str(cfg) in t.stdout, t.stderr
    plan, err = _plan(ws, env)
    assert honoured(plan) and err == "", (plan, err)  # trusted: honoured, silently
    assert plan["config_sources"][0]["trusted"] is True

    cfg.write_text(cfg.read_text() + "# edited\n")  # any change withdraws the trust
    plan, err = _plan(ws, env)
    assert not honoured(plan) and "changed since `firma trust`" in err


def test_a_changed_referenced_policy_withdraws_the_trust(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    _project(ws, '[run]\npolicy = "permit.cedar"\n')
    assert run_firma(["trust"], cwd=ws, env=env).returncode == 0
    assert _plan(ws, env)[0]["policy"] is not None
    (ws / ".firma" / "permit.cedar").write_text("permit(principal, action, resource);\n// more\n")
    plan, err = _plan(ws, env)
    assert plan["policy"] is None and "permit.cedar changed since `firma trust`" in err
    show = run_firma(["trust", "--show"], cwd=ws, env=env)
    assert "changed since" in show.stdout


def test_narrowing_keys_apply_untrusted_and_only_add(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    user = tmp_path / "user.toml"
    user.write_text('[run]\nprotected_paths = ["keep.me"]\nmask_paths = ["/etc/hostname"]\n')
    _project(ws, '[run]\nprotected_paths = ["deploy.env"]\nmask_paths = []\n')
    plan, err = _plan(ws, env, "--config", str(user))
    # --config replaces discovery: the project file is not read at all with an explicit config
    assert plan["protected_paths"] == ["keep.me"] and err == ""
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    (tmp_path / "xdg" / "firma").mkdir(parents=True)
    shutil.copy(user, tmp_path / "xdg" / "firma" / "config.toml")
    plan, err = _plan(ws, env)
    assert plan["protected_paths"] == ["keep.me", "deploy.env"]  # added to the user's, not replacing
    assert plan["mask_paths"] == ["/etc/hostname"]  # an empty list from the project clears nothing
    assert err == ""  # nothing was refused


def test_a_config_others_could_write_is_never_read(tmp_path):
    """As root, a project config in a directory another user owns, or in a world-writable one, is
    not read (another local user could have planted it). Control: the same file, owned by the
    caller in a private directory, is read."""
    if os.geteuid() != 0:
        pytest.fail("the test chowns files to another user; CI runs as root")
    other = pwd.getpwnam("firma-test").pw_uid
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    cfg = _project(ws, '[run]\nprotected_paths = ["x"]\n')
    plan, err = _plan(ws, env)
    assert plan["protected_paths"] == ["x"] and err == ""  # control
    os.chown(ws / ".firma", other, other)
    plan, err = _plan(ws, env)
    assert plan["protected_paths"] == [] and "not read" in err and f"uid {other}" in err
    os.chown(ws / ".firma", 0, 0)
    os.chmod(ws / ".firma", 0o777)
    plan, err = _plan(ws, env)
    assert plan["protected_paths"] == [] and "writable by other users" in err
    os.chmod(ws / ".firma", 0o755)
    os.chown(cfg, other, other)
    plan, err = _plan(ws, env)
    assert plan["protected_paths"] == [] and f"owned by uid {other}" in err


class _MustNotConnect:
    """A loopback listener that records every connection: the test fails if anything arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_what_one_run_writes_into_firma_dirs_does_not_change_the_next(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sub").mkdir()
    env = _env(tmp_path)
    listener = _MustNotConnect()
    try:
        evil = (f'[run]\nallow_hosts = ["127.0.0.1:{listener.port}"]\n'
                'env_passthrough = ["HOME", "PATH", "GITHUB_TOKEN"]\n')
        plant = (f"mkdir -p .firma sub/.firma && printf '%s' '{evil}' > .firma/firma.toml && "
                 f"cp .firma/firma.toml sub/.firma/firma.toml")
        p = run_firma(["run", "--", "sh", "-c", plant], cwd=ws, env=env)
        # the post-run check reports the planted configs (exit 3); the next runs must ignore them anyway
        assert p.returncode == 3 and ".firma" in p.stderr, p.stderr
        assert (ws / ".firma" / "firma.toml").exists() and (ws / "sub" / ".firma" / "firma.toml").exists()
        probe = (f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{listener.port}/ ; "
                 'echo " token=${GITHUB_TOKEN:-none}"')
        for where in (ws, ws / "sub"):
            p = run_firma(["run", "--", "sh", "-c", probe], cwd=where, env=env)
            assert p.returncode == 0, p.stderr
            assert SECRET not in p.stdout and "token=none" in p.stdout, p.stdout
            assert p.stdout.startswith("403"), p.stdout  # the sidecar denied it
            assert "ignored allow_hosts, env_passthrough" in p.stderr
        assert listener.hits == 0
        # control: the same listener is reachable outside, so silence above is evidence
        socket.create_connection(("127.0.0.1", listener.port), timeout=3).close()
        deadline = 50
        while listener.hits == 0 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert listener.hits == 1
    finally:
        listener.close()


def _proof(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(path.read_text())


def test_a_monitor_run_is_not_called_enforced(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    p = run_firma(["run", "--monitor", "--", "true"], cwd=ws, env=_env(tmp_path))
    assert p.returncode == 0, p.stderr
    proof = _proof(tmp_path)
    assert proof["enforced"] is False and proof["mode"] == "monitor"
    assert {"setting": "monitor", "detail": "monitor mode: denials are logged, the traffic passes",
            "source": "command line"} in proof["weakenings"]
    # control: the same run without --monitor is enforced, with no weakening
    shutil.rmtree(tmp_path / "state")
    assert run_firma(["run", "--", "true"], cwd=ws, env=_env(tmp_path)).returncode == 0
    proof = _proof(tmp_path)
    assert proof["enforced"] is True and proof["mode"] == "enforce" and proof["weakenings"] == []


def test_the_proof_names_the_run_and_each_weakening_with_its_source(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    cfg = _project(ws, (
        '[run]\nallow_hosts = ["api.example.com"]\npolicy = "permit.cedar"\n'
        '[run.defaults]\nmask_home_paths = [".aws"]\nenv_passthrough = ["HOME", "PATH", "GITHUB_TOKEN"]\n'
        f'mounts = [{{source = "{data}", target = "/tmp/data-inside"}}]\n'
    ))
    assert run_firma(["trust"], cwd=ws, env=env).returncode == 0
    p = run_firma(["run", "--", "sh", "-c", "exit 7"], cwd=ws, env=env)
    assert p.returncode == 7, p.stderr
    proof = _proof(tmp_path)
    assert proof["command"] == ["sh", "-c", "exit 7"] and proof["cwd"] == str(ws) and proof["exit_status"] == 7
    assert proof["allow_hosts"] == ["api.example.com"]
    import hashlib
    assert proof["policy"] == {"path": str(ws / ".firma" / "permit.cedar"),
                               "sha256": hashlib.sha256((ws / ".firma" / "permit.cedar").read_bytes()).hexdigest()}
    (source,) = proof["config"]
    assert source["path"] == str(cfg) and source["trusted"] is True
    where = f"{cfg} [run.defaults]"
    got = {(w["setting"], w["detail"], w["source"]) for w in proof["weakenings"]}
    assert ("mask_home_paths", "~/.ssh is not masked", where) in got
    assert ("env_passthrough", "GITHUB_TOKEN is passed to the agent", where) in got
    assert ("mounts", f"{data} -> /tmp/data-inside (read-write)", where) in got
    assert all(w["source"] == where for w in proof["weakenings"])


def test_firma_proofs_lists_runs_and_keep_proofs_prunes(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    (tmp_path / "xdg" / "firma").mkdir(parents=True)
    (tmp_path / "xdg" / "firma" / "config.toml").write_text("[state]\nkeep_proofs = 2\n")
    _project(ws, "[state]\nkeep_proofs = 100\n")  # untrusted: may not keep more (widening)
    for code in (3, 4, 5):
        p = run_firma(["run", "--", "sh", "-c", f"exit {code}"], cwd=ws, env=env)
        assert p.returncode == code and "ignored state.keep_proofs" in p.stderr, p.stderr
    assert len(list((tmp_path / "state" / "proofs").glob("sbx_*.json"))) == 2  # pruned to the user's 2
    listing = run_firma(["proofs", "--json"], cwd=ws, env=env)
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [r["exit_status"] for r in rows] == [5, 4]  # newest first
    assert rows[0]["command"] == ["sh", "-c", "exit 5"] and rows[0]["enforced"] is True
    pruned = run_firma(["proofs", "--prune", "--keep", "1"], cwd=ws, env=env)
    assert pruned.returncode == 0 and "pruned 1 proofs" in pruned.stdout
    assert len(list((tmp_path / "state" / "proofs").glob("sbx_*.json"))) == 1

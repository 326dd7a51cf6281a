"""Pure core of `firma run`: config, profiles, identity, planner, launch env, bwrap argv plan."""

from __future__ import annotations

import re
import uuid

import pytest

from firma.core import bwrap_plan, config as cfgmod, launchenv, profiles
from firma.core.identity import attribution_user, build_identity, uuid7
from firma.core.model import ExecutionEnvelope, IdentityMode, Mount, NetworkEndpoints, frozen_map
from firma.core import settings
from firma.core.planner import RunArgs, build_plan, plan_to_json
from firma.core.settings import state_root
from firma.errors import ConfigError, PlanError, UnsupportedBackendError
from firma.core.hostfacts import Host

R = bytes(range(20))


def host(**env) -> Host:
    base = {"HOME": "/home/u", "PATH": "/usr/bin", "LOGNAME": "alice"}
    base.update(env)
    return Host(system="linux", uid=1000, gid=1000, bwrap_path="/usr/bin/bwrap", bwrap_version="bubblewrap 0.8.0", environ=base)


def plan(args=None, cfg=cfgmod.EMPTY, h=None, cwd="/work/p"):
    return build_plan(args or RunArgs(command=("agent",)), cfg, h or host(), cwd=cwd, unix_ms=1_700_000_000_000, rand=R)


# --- config ----------------------------------------------------------------------------------

def _env(config: str | None, home: str | None) -> dict[str, str]:
    env = {}
    if config is not None:
        env["FIRMA_CONFIG"] = config
    if home is not None:
        env["HOME"] = home
    return env


def test_discover_order_and_walk_up():
    files = {"/home/u/proj/.firma/firma.toml", "/etc/x.toml", "/cfg/env.toml"}
    isf = files.__contains__
    assert settings.discover_config("/etc/x.toml", _env("/cfg/env.toml", "/home/u"), "/home/u/proj/a/b", isf) == "/etc/x.toml"
    assert settings.discover_config(None, _env("/cfg/env.toml", "/home/u"), "/home/u/proj/a", isf) == "/cfg/env.toml"
    assert settings.discover_config(None, _env(None, "/home/u"), "/home/u/proj/a/b", isf) == "/home/u/proj/.firma/firma.toml"
    # stops at $HOME: a file above it is not used
    assert settings.discover_config(None, _env(None, "/home/u"), "/home/u/other", {"/home/.firma/firma.toml"}.__contains__) is None
    with pytest.raises(ConfigError, match="does not exist"):
        settings.discover_config("missing.toml", _env(None, None), "/w", isf)


def test_unknown_keys_name_key_and_file():
    with pytest.raises(ConfigError, match=r"/p/firma.toml: unknown key 'alow_hosts' in \[run.defaults\]"):
        cfgmod.parse("[run.defaults]\nalow_hosts = []\n", "/p/firma.toml")
    with pytest.raises(ConfigError, match="unknown key 'other'"):
        cfgmod.parse("[other]\nx = 1\n", "/p/firma.toml")
    with pytest.raises(ConfigError, match="unknown profile 'gpt'"):
        cfgmod.parse("[run.profiles.gpt]\nagent_id='x'\n", "/p/firma.toml")


def test_layered_merge_scalars_lists_maps_and_relative_paths():
    cfg = cfgmod.parse(
        """
[run]
agent_id = "top"
policy = "pol/a.cedar"
[run.defaults]
allow_hosts = ["a.com"]
env_set = { A = "1", B = "1" }
mounts = [{ source = "data", target = "/data", read_only = true }]
[run.profiles.claude]
env_set = { B = "2" }
mask_home_paths = []
""",
        "/proj/.firma/firma.toml",
    )
    p = profiles.resolve("claude-code")
    eff = cfgmod.effective(p, cfg, {"agent_id": "cli"})
    assert eff["agent_id"] == "cli"
    assert eff["allow_hosts"] == ("a.com",)  # list replaced the profile's
    assert eff["env_set"] == {"DISABLE_AUTOUPDATER": "1", "A": "1", "B": "2"}  # maps merge key by key (the profile's too)
    assert eff["mask_home_paths"] == ()  # empty list clears
    assert eff["policy"] == "/proj/.firma/pol/a.cedar"
    assert eff["mounts"] == (Mount("/proj/.firma/data", "/data", True),)
    assert eff["writable_home_paths"] == (".claude", ".claude.json")


def test_mount_target_must_be_absolute():
    with pytest.raises(ConfigError, match="must be absolute"):
        cfgmod.parse('[run]\nmounts = [{source="/a", target="rel"}]\n', "/f.toml")


# --- profiles + identity ---------------------------------------------------------------------

def test_profile_choice():
    assert profiles.choose_profile_name(None, None, "/usr/bin/claude") == "claude-code"
    assert profiles.choose_profile_name(None, None, "codex") == "codex"
    assert profiles.choose_profile_name(None, "codex", "claude") == "codex"
    assert profiles.choose_profile_name("generic", "codex", "claude") == "generic"
    assert profiles.choose_profile_name(None, None, "python3") == "generic"
    with pytest.raises(ConfigError, match="^unknown profile 'x'; supported profiles: generic, claude-code, codex$"):
        profiles.choose_profile_name("x", None, None)


def test_uuid7_and_identity():
    text = uuid7(1_700_000_000_000, R)
    u = uuid.UUID(text)  # the stdlib parses it and agrees on version, variant and spelling
    assert u.version == 7 and u.variant == uuid.RFC_4122 and str(u) == text
    assert int(u.hex[:12], 16) == 1_700_000_000_000
    assert uuid7(1_700_000_000_000, bytes(10)) != uuid7(1_700_000_000_000, b"\xff" * 10)
    ident = build_identity(environ={"USER": "bob"}, profile="codex", agent_id=None, unix_ms=1, rand=R)
    assert re.fullmatch(r"sbx_[0-9a-f]{32}", ident.sandbox_id)
    assert ident.agent_id == "codex" and ident.user == "bob"
    assert uuid.UUID(ident.session_id).version == 7
    assert build_identity(environ={"FIRMA_RUN_SESSION_ID": " s1 "}, profile="g", agent_id="a", unix_ms=1, rand=R).session_id == "s1"
    assert build_identity(environ={"FIRMA_RUN_SESSION_ID": "  "}, profile="g", agent_id="a", unix_ms=1, rand=R).session_id != "  "
    assert attribution_user({"LOGNAME": "", "USER": "u", "USERNAME": "n"}) == "u"
    assert attribution_user({}) == "unknown"
    assert list(ident.attribution_headers()) == sorted(ident.attribution_headers())


# --- planner + launch env ----------------------------------------------------------------------

def test_launch_env_built_from_empty():
    h = host(SECRET_TOKEN="s", ANTHROPIC_API_KEY="k", FIRMA_CAPABILITY_TOKEN="t", TERM="xterm")
    p = plan(RunArgs(command=("claude",)), h=h)
    assert p.identity.profile == "claude-code"
    env = dict(p.base_env)
    assert "SECRET_TOKEN" not in env and "FIRMA_CAPABILITY_TOKEN" not in env
    assert env["ANTHROPIC_API_KEY"] == "k" and env["HOME"] == "/home/u" and env["TERM"] == "xterm"
    assert env["USER"] == env["LOGNAME"] == "firma-user"
    assert env["FIRMA_RUN_SANDBOX_ID"] == p.identity.sandbox_id
    full = launchenv.with_proxy(p.base_env, "http://127.0.0.1:18080")
    for k in launchenv.PROXY_VARS:
        assert full[k] == "http://127.0.0.1:18080"
    assert full["NO_PROXY"] == full["no_proxy"] == ""
    host_user = plan(RunArgs(command=("x",), preserve_host_user=True), h=h)
    assert host_user.identity_mode is IdentityMode.HOST_USER and "USER" not in host_user.base_env


def test_plan_refusals():
    with pytest.raises(PlanError, match="^FIRMA_RUN_SANDBOX_ID is reserved for internal child propagation; unset it$"):
        plan(h=host(FIRMA_RUN_SANDBOX_ID=""))
    with pytest.raises(UnsupportedBackendError, match="^unsupported backend 'k8s'; expected one of: bwrap, vz, runner$"):
        plan(RunArgs(command=("x",), backend="k8s"))
    with pytest.raises(PlanError, match="inside the workspace"):
        plan(h=host(FIRMA_STATE_DIR="/work/p/.state"))
    with pytest.raises(ConfigError, match="invalid sidecar endpoint"):
        plan(RunArgs(command=("x",), sidecar="http://x"))


def test_state_root_order():
    assert state_root({"FIRMA_STATE_DIR": "/s", "XDG_RUNTIME_DIR": "/run/user/1"}, 1) == "/s"
    assert state_root({"XDG_RUNTIME_DIR": "/run/user/1"}, 1) == "/run/user/1/firma"
    assert state_root({}, 7) == "/tmp/firma-7"


def test_allow_host_adds_and_non_structural_sources():
    cfg = cfgmod.parse('[run]\nallow_hosts=["a.com"]\n', "/c/firma.toml")
    p = plan(RunArgs(command=("x",), allow_hosts=("b.com",)), cfg=cfg)
    assert p.allow_hosts == ("a.com", "b.com")
    assert plan(h=host(FIRMA_RUN_ALLOW_NON_STRUCTURAL=" Yes ")).allow_non_structural
    assert not plan(h=host(FIRMA_RUN_ALLOW_NON_STRUCTURAL="2")).allow_non_structural
    assert plan_to_json(plan())["command"] == ["agent"]


def test_effective_config_redacts_secrets():
    doc = plan_to_json(plan(RunArgs(command=("claude",)), h=host(ANTHROPIC_API_KEY="sk-live")))
    assert doc["env"]["ANTHROPIC_API_KEY"] == "<redacted>"


# --- bwrap plan --------------------------------------------------------------------------------

def envelope(**kw) -> ExecutionEnvelope:
    base = dict(
        sandbox_id="sbx_1", runtime_dir="/st/run/sbx_1", executable="agent", args=("--x",), cwd="/work/p",
        env=frozen_map({"PATH": "/usr/bin", "HTTP_PROXY": "http://127.0.0.1:18080"}), identity_mode=IdentityMode.SANDBOX_USER,
        home="/home/u", seccomp_filter_path=None, mounts=(Mount("/data", "/data", True),),
        mask_home_paths=(".ssh", ".netrc", ".aws"), network=NetworkEndpoints("http://127.0.0.1:18080", "127.0.0.1:53"),
    )
    base.update(kw)
    return ExecutionEnvelope(**base)


KINDS = {"/tmp": "dir", "/var/tmp": "dir", "/run": "dir", "/var/run": "symlink", "/home/u/.ssh": "dir",
         "/home/u/.netrc": "file", "/etc/shadow": "file", "/etc/sudoers.d": "dir", "/etc/resolv.conf": "symlink",
         "/root": "dir", "/st": "dir"}


def facts(uid=1000, **kw):
    return bwrap_plan.BwrapFacts(caller_uid=uid, caller_gid=uid, kinds=frozen_map(KINDS),
                                 resolv_conf_target="/run/systemd/resolve/stub-resolv.conf",
                                 xdg_runtime_dir="/run/user/1000", state_root="/st", **kw)


def pairs(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_bwrap_plan_shape_unprivileged():
    p = bwrap_plan.build(envelope(), facts(), info_fd=5, block_fd=6, seccomp_fd=7)
    a = p.argv
    for flag in ("--unshare-user", "--disable-userns", "--unshare-net", "--unshare-pid", "--unshare-ipc",
                 "--unshare-uts", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in a
    assert a.index("--clearenv") < a.index("--setenv")
    assert pairs(a, "--uid") == ["1000"]
    tmpfs = pairs(a, "--tmpfs")
    assert tmpfs[:4] == ["/tmp", "/var/tmp", "/run", "/st"]  # /run/user/1000 is under /run; /var/run is a symlink to it
    assert "/home/u/.ssh" in tmpfs and "/root" not in tmpfs
    assert a[a.index("/home/u/.netrc") - 2] == "--ro-bind" and a[a.index("/home/u/.netrc") - 1] == "/dev/null"
    assert pairs(a, "--seccomp") == ["7"] and pairs(a, "--info-fd") == ["5"] and pairs(a, "--block-fd") == ["6"]
    assert a[-4:] == ("--", "agent", "--x") or a[-3:] == ("--", "agent", "--x")
    # resolv.conf bound over the symlink target too, and generated identity files
    binds = [(a[i + 1], a[i + 2]) for i, x in enumerate(a) if x == "--ro-bind"]
    assert ("/st/run/sbx_1/resolv.conf", "/run/systemd/resolve/stub-resolv.conf") in binds
    assert ("/st/run/sbx_1/resolv.conf", "/etc/resolv.conf") in binds
    assert ("/st/run/sbx_1/passwd", "/etc/passwd") in binds
    # order: tmpfs → workspace/mounts → home masks → /etc files
    assert a.index("/tmp") < a.index("/work/p") < a.index("/home/u/.ssh") < a.index("/etc/passwd")
    assert ("/data", "/data") in binds


def test_bwrap_plan_as_root_never_runs_agent_as_root_and_masks_secrets():
    p = bwrap_plan.build(envelope(home="/root", mask_home_paths=()), facts(uid=0))
    a = p.argv
    assert p.inside_uid == 1000 and pairs(a, "--uid") == ["1000"] and pairs(a, "--gid") == ["1000"]
    assert "--unshare-user" in a and "--disable-userns" in a
    assert "/root" in pairs(a, "--tmpfs") and "/etc/sudoers.d" in pairs(a, "--tmpfs")
    binds = [(a[i + 1], a[i + 2]) for i, x in enumerate(a) if x == "--ro-bind"]
    assert ("/dev/null", "/etc/shadow") in binds
    assert a.index("/root") < a.index("/work/p")  # workspace re-exposed after the /root mask
    assert {"/root", "/etc/shadow", "/etc/sudoers.d"} <= set(p.masked)


def test_bwrap_plan_host_user_identity_keeps_host_passwd():
    p = bwrap_plan.build(envelope(identity_mode=IdentityMode.HOST_USER), facts())
    assert "/etc/passwd" not in p.argv and [f.target for f in p.files] == ["/etc/resolv.conf", "/etc/hosts"]


def test_bwrap_plan_is_immutable_data():
    p = bwrap_plan.build(envelope(), facts())
    assert isinstance(p.argv, tuple)
    with pytest.raises(Exception):
        p.argv = ()  # type: ignore[misc]  # the point: a frozen record refuses it
    assert bwrap_plan.RESOLV_CONF == "nameserver 127.0.0.1\noptions ndots:0 timeout:1 attempts:1\n"


def test_symlinked_secret_is_masked_at_its_target():
    kinds = dict(KINDS, **{"/home/u/.ssh": "symlink", "/dotfiles/ssh": "dir", "/home/u/.aws": "symlink"})
    f = bwrap_plan.BwrapFacts(caller_uid=1000, caller_gid=1000, kinds=frozen_map(kinds),
                              realpaths=frozen_map({"/home/u/.ssh": "/dotfiles/ssh"}))
    p = bwrap_plan.build(envelope(), f)
    assert "/dotfiles/ssh" in pairs(p.argv, "--tmpfs") and "/dotfiles/ssh" in p.masked
    assert "/home/u/.ssh" not in p.argv
    assert "/home/u/.aws" not in p.argv  # dangling link: nothing to hide


@pytest.mark.parametrize("cwd", ["/", "/etc", "/usr", "/usr/local", "/var", "/tmp", "/opt", "/proc/self", "/sys/fs", "/dev/shm"])
def test_system_directories_are_never_the_workspace(cwd):
    with pytest.raises(PlanError, match=f"refusing {cwd} as the workspace: the agent could write a system directory"):
        plan(cwd=cwd)


def test_home_and_its_ancestors_are_never_the_workspace():
    with pytest.raises(PlanError, match="refusing /home/u as the workspace: it is your home directory"):
        plan(cwd="/home/u")
    elsewhere = Host(system="linux", environ={"HOME": "/data/users/u", "PATH": "/usr/bin"})
    with pytest.raises(PlanError, match="refusing /data/users as the workspace: it is an ancestor of your home directory /data/users/u"):
        build_plan(RunArgs(command=("agent",)), cfgmod.EMPTY, elsewhere, cwd="/data/users", unix_ms=1_700_000_000_000, rand=R)


def test_a_symlinked_home_is_compared_resolved():
    links = {"/home/u": "/data/u"}
    with pytest.raises(PlanError, match="it is your home directory"):
        build_plan(RunArgs(command=("agent",)), cfgmod.EMPTY, host(), cwd="/data/u", unix_ms=1_700_000_000_000, rand=R,
                   realpath=lambda p: links.get(p, p))


@pytest.mark.parametrize("cwd", ["/home/u/proj", "/srv/app", "/opt/src/x", "/var/lib/build/ws", "/work/p"])
def test_project_directories_are_workspaces(cwd):
    assert plan(cwd=cwd).cwd == cwd

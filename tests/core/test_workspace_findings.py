"""The post-run workspace check's pure parts: the git config reader and its code-running keys,
the git index reader (versions 2, 3, 4), the findings block, the exit status, agent settings."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from firma.core import config as cfgmod, gitconfig, gitindex, model
from firma.core import workspace_findings as wf
from firma.core.workspace_findings import Finding
from firma.errors import ConfigError

# --- git config ---------------------------------------------------------------------------------


def names(text: str) -> list[str]:
    return [e.name for e in gitconfig.code_running(text)]


def test_config_grammar():
    text = (
        "\ufeff# comment\n[Core]\n\tFsMonitor = \"/x/evil.sh\" ; trailing\n  bare\n"
        '[remote "Or\\"ig"] url = x\n  uploadpack = a \\\n  b\n'
        "[alias]\n st = !echo hi\n co = checkout\n"
        '[includeIf "gitdir:/x/"]\n path = ../inc\n[filter.lfs]\n clean = git-lfs clean\n'
        "[pager]\n log = false\n diff = less\n[core]\nfsmonitor = true\n"
    )
    got = {e.name: e.value for e in gitconfig.entries(text)}
    assert got["core.fsmonitor"] == "true"  # the later one
    assert got["core.bare"] is None
    assert got['remote.Or"ig.url'] == "x" and got['remote.Or"ig.uploadpack'].startswith("a") and got['remote.Or"ig.uploadpack'].endswith("b")
    assert names(text) == [
        "core.fsmonitor", 'remote.Or"ig.uploadpack', "alias.st", "includeif.gitdir:/x/.path",
        "filter.lfs.clean", "pager.diff",
    ]


@pytest.mark.parametrize("line", [
    "[core]\nfsmonitor = x", "[core]\nhooksPath = h", "[core]\nsshCommand = s", "[core]\npager = p",
    "[core]\neditor = e", "[core]\naskPass = a", "[credential]\nhelper = h", '[credential "https://x"]\nhelper = h',
    '[filter "a"]\nsmudge = s', '[filter "a"]\nprocess = p', '[diff "a"]\ntextconv = t', '[diff "a"]\ncommand = c',
    '[merge "a"]\ndriver = d', "[include]\npath = p", '[includeIf "onbranch:x"]\npath = p', "[alias]\nx = !sh",
    "[sequence]\neditor = e", "[gpg]\nprogram = g", '[gpg "ssh"]\nprogram = g', "[pager]\nlog = less",
    "[uploadpack]\npackObjectsHook = h", '[remote "o"]\nuploadpack = u', '[remote "o"]\nreceivepack = r',
    '[protocol "ext"]\nallow = always', '[submodule "s"]\nupdate = !cmd',
])
def test_code_running_keys(line):
    assert len(gitconfig.code_running(line)) == 1


@pytest.mark.parametrize("line", [
    "[core]\nfsmonitor = false", "[core]\nfsmonitor = true", "[alias]\nco = checkout", "[pager]\nlog = false",
    '[protocol "file"]\nallow = always', '[protocol "ext"]\nallow = never', "[user]\nname = x",
    '[remote "o"]\nurl = /x', "[core]\nhooksPath =", "fsmonitor = x",  # no section: git refuses the file
    '[submodule "s"]\nupdate = checkout', "[core]\nfsmonitor junk",
])
def test_not_code_running(line):
    assert gitconfig.code_running(line) == ()


def test_hooks_and_include_paths():
    found = gitconfig.entries('[core]\nhooksPath = .husky\n[include]\npath = a.inc\n[includeIf "gitdir:x"]\npath = b.inc\n')
    assert gitconfig.hooks_paths(found) == (".husky",)
    assert gitconfig.include_paths(found) == ("a.inc", "b.inc")
    assert gitconfig.object_hash_size(gitconfig.entries("[extensions]\nobjectFormat = sha256\n")) == 32
    assert gitconfig.object_hash_size(found) == 20


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]"\\\n\t =#;.abcAB-!')), max_size=200))
def test_config_reader_never_crashes(text):
    for e in gitconfig.entries(text):
        assert e.section == e.section.lower() and e.key == e.key.lower()
        gitconfig.runs_code(e)


# --- git index ----------------------------------------------------------------------------------


def index(entries: list[tuple[str, int]], version: int = 2, hash_size: int = 20, extended: bool = False) -> bytes:
    out = bytearray(b"DIRC" + struct.pack(">II", version, len(entries)))
    previous = b""
    for path, mode in entries:
        raw = path.encode()
        start = len(out)
        flags = min(len(raw), 0xFFF) | (0x4000 if extended else 0)
        out += struct.pack(">10I", 0, 0, 0, 0, 0, 0, mode, 0, 0, 0) + b"\x11" * hash_size + struct.pack(">H", flags)
        if extended:
            out += b"\x00\x00"
        if version == 4:
            common = 0
            while common < min(len(previous), len(raw)) and previous[common] == raw[common]:
                common += 1
            out += varint(len(previous) - common) + raw[common:] + b"\0"
        else:
            out += raw + b"\0"
            while (len(out) - start) % 8:
                out += b"\0"
        previous = raw
    out += b"TREE" + struct.pack(">I", 0)
    return bytes(out) + hashlib.sha1(out).digest()


def varint(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        n -= 1
        out.insert(0, 0x80 | (n & 0x7F))
        n >>= 7
    return bytes(out)


FILES = [("README", 0o100644), ("lib/a.py", 0o100644), ("lib/sub", 0o160000), ("lib/sub2", 0o160000), ("z" * 300, 0o120000)]


@pytest.mark.parametrize("version,extended", [(2, False), (3, False), (3, True), (4, False), (4, True)])
@pytest.mark.parametrize("hash_size", [20, 32])
def test_index_gitlinks(version, extended, hash_size):
    got = gitindex.gitlinks(index(FILES, version, hash_size, extended), hash_size)
    assert got.version == version and got.entries == len(FILES)
    assert got.gitlinks == ("lib/sub", "lib/sub2")


def test_index_varint_matches_git():
    for n in (0, 1, 127, 128, 255, 16511, 16512, 1 << 20):
        assert gitindex._varint(varint(n), 0) == (n, len(varint(n)))


@pytest.mark.parametrize("data,msg", [
    (b"", "DIRC"), (b"DIRX" + bytes(8), "DIRC"), (b"DIRC" + struct.pack(">II", 5, 0), "version 5"),
    (b"DIRC" + struct.pack(">II", 2, 1000), "exceeds"),
    (index([("a", 0o160000)], 2, extended=True), "extended flags in a version 2"),
    (index([("a", 0o160000)])[:75], "unterminated|truncated"),
])
def test_index_refuses_malformed(data, msg):
    with pytest.raises(gitindex.IndexFormatError, match=msg):
        gitindex.gitlinks(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([2, 3, 4]), st.integers(0, 5))
def test_index_reader_never_crashes(tail, version, count):
    data = b"DIRC" + struct.pack(">II", version, count) + tail
    try:
        gitindex.gitlinks(data)
    except gitindex.IndexFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_index_reader_survives_corruption(at, junk):
    good = index(FILES, 4)
    data = good[:at] + junk + good[at + len(junk):]
    try:
        gitindex.gitlinks(data)
    except gitindex.IndexFormatError:
        pass


# --- the block, the status, the config key --------------------------------------------------------


F = Finding(wf.GIT_CONFIG, "/w/sub/.git/config", "core.fsmonitor = 'x' runs a program", "delete the line")


def test_render_one_line_per_finding_and_escapes_agent_names():
    evil = Finding(wf.TOOL_CONFIG, "/w/.envrc\n  [ok] forged\x1b[2J", "new", "rm it")
    block = wf.render((F, evil), wf.FAIL)
    lines = block.splitlines()
    assert len(lines) == 3 and "exit status 3" in lines[0]
    assert lines[1] == "  [git-config] /w/sub/.git/config: core.fsmonitor = 'x' runs a program -- remove: delete the line"
    assert "\\n" in lines[2] and "\\x1b" in lines[2] and "\x1b" not in block
    assert wf.render((), wf.FAIL) == ""
    assert "warn" in wf.render((F,), wf.WARN).splitlines()[0]


@pytest.mark.parametrize("status,findings,mode,want", [
    (0, (F,), wf.FAIL, 3), (0, (), wf.FAIL, 0), (5, (F,), wf.FAIL, 5), (130, (F,), wf.FAIL, 130),
    (0, (F,), wf.WARN, 0), (2, (F,), wf.WARN, 2),
])
def test_exit_status(status, findings, mode, want):
    assert wf.exit_status(status, findings, mode) == want


def test_config_key_validated():
    cfg = cfgmod.parse('[run]\non_workspace_findings = "warn"\n', "/p/firma.toml")
    assert cfg.run["on_workspace_findings"] == "warn"
    with pytest.raises(ConfigError, match='on_workspace_findings must be "fail" or "warn", not \'ignore\''):
        cfgmod.parse('[run]\non_workspace_findings = "ignore"\n', "/p/firma.toml")
    with pytest.raises(ConfigError, match="on_workspace_findings"):
        cfgmod.parse("[run]\non_workspace_findings = true\n", "/p/firma.toml")


def test_default_mode_spelled_once():
    """RunPlan cannot import workspace_findings (a cycle): its default copy agrees."""
    assert model.RunPlan.__record_fields__[[f.name for f in model.RunPlan.__record_fields__].index("on_workspace_findings")].default == wf.FAIL


def test_tool_config_names_come_from_the_protected_list():
    assert {".cargo", ".envrc", ".vscode", ".gitmodules", ".npmrc"} <= wf.TOOL_CONFIG_NAMES
    assert not any("/" in n for n in wf.TOOL_CONFIG_NAMES)


# --- agent settings under writable home paths -----------------------------------------------------


def test_home_findings_only_new_definitions():
    before = '{"mcpServers": {"mine": {"command": "a"}}, "theme": "dark"}'
    after = '{"mcpServers": {"mine": {"command": "a"}, "evil": {"command": "sh"}}, "projects": {"/w": {"hooks": {"Stop": [1]}}}}'
    got = wf.home_findings("/h/.claude.json", before, after, "json")
    assert [f.detail.split(" ")[0] for f in got] == ["mcpServers.evil", "projects./w.hooks.Stop"]
    assert wf.home_findings("/h/.claude.json", after, after, "json") == ()
    assert wf.home_findings("/h/x.json", None, "{not json", "json") == ()
    toml = wf.home_findings("/h/.codex/config.toml", None, '[mcp_servers.x]\ncommand = "sh"\n', "toml")
    assert [f.detail.split(" ")[0] for f in toml] == ["mcp_servers.x"]
    changed = wf.home_findings("/h/s.json", '{"hooks": {"Stop": [1]}}', '{"hooks": {"Stop": [2]}}', "json")
    assert len(changed) == 1  # a changed definition counts as new

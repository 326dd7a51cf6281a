"""Pure policy parsing and rule mapping (DESIGN §10)."""

from __future__ import annotations

import errno

import pytest

from firma.core.seccomp_policy import (
    MODE_SETTERS,
    S_ISGID,
    S_ISUID,
    ACTIONS,
    AF_PACKET,
    HARDENING,
    TIOCSTI,
    default_policy,
    parse_policy,
)
from firma.errors import SeccompError

GOOD = b'policy_id = "p"\npolicy_version = "2"\ndefault_action = "allow"\ndeny_actions = []\n'


def parse(text: str):
    return parse_policy(text.encode(), "/x/p.toml")


def test_minimal_policy_parses():
    pol = parse_policy(GOOD, "/x/p.toml")
    assert (pol.policy_id, pol.policy_version, pol.deny_actions) == ("p", "2", ())
    assert pol.source_path == "/x/p.toml" and len(pol.source_sha256) == 64


def test_actions_map_to_spec_syscalls():
    assert ACTIONS["credential.write"] == (
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
        "setfsuid", "setfsgid")
    assert ACTIONS["system.execute"] == ("execve", "execveat")
    assert ACTIONS["filesystem.delete"] == (
        "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2")


def test_unknown_key_is_named():
    with pytest.raises(SeccompError, match=r"/x/p.toml: unknown key 'extra'"):
        parse(GOOD.decode() + 'extra = 1\n')


def test_unknown_action_is_named():
    with pytest.raises(SeccompError, match=r"unknown action 'network.connect'"):
        parse(GOOD.decode().replace("[]", '["network.connect"]'))


@pytest.mark.parametrize("text, match", [
    ('policy_id = "p"\npolicy_version = "1"\ndefault_action = "allow"\n', "missing required key 'deny_actions'"),
    (GOOD.decode().replace('"allow"', '"deny"'), 'default_action must be "allow"'),
    (GOOD.decode().replace("[]", '["system.execute", "system.execute"]'), "listed twice"),
    (GOOD.decode().replace('"p"', '"../etc"'), "policy_id"),
    (GOOD.decode().replace('"p"', '"firma-default"'), "reserved"),
    (GOOD.decode().replace('"2"', "true"), "policy_version"),
    (GOOD.decode().replace("[]", '"system.execute"'), "list of strings"),
    ("policy_id = ", "invalid TOML"),
])
def test_invalid_policies_are_refused(text, match):
    with pytest.raises(SeccompError, match=match) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_integer_version_is_accepted_as_text():
    assert parse(GOOD.decode().replace('"2"', "3")).policy_version == "3"


def test_execute_deny_goes_to_the_exec_gate_not_the_bpf():
    pol = parse(GOOD.decode().replace("[]", '["system.execute", "credential.write"]'))
    assert pol.exec_gate
    names = {r.syscall for r in pol.rules()}
    assert "execve" not in names and "execveat" not in names
    assert {"setuid", "setgroups"} <= names
    assert pol.denied_syscalls[:2] == ("setuid", "setgid")


def test_default_policy_is_hardening_only():
    pol = default_policy()
    assert pol.deny_actions == () and not pol.exec_gate
    assert pol.rules() == HARDENING


def test_hardening_covers_the_spec_list():
    names = {r.syscall for r in HARDENING}
    for s in ("io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace",
              "process_vm_writev", "kexec_load", "init_module", "finit_module", "mount", "umount2",
              "pivot_root", "unshare", "setns", "ioctl", "socket"):
        assert s in names, s
    ioctl = [r for r in HARDENING if r.syscall == "ioctl"]
    assert any(a.value == TIOCSTI and a.mask == 0xFFFFFFFF for r in ioctl for a in r.args)
    sock = [r for r in HARDENING if r.syscall == "socket"]
    assert [a.value for r in sock for a in r.args] == [AF_PACKET]
    # Only clone3 and openat2 differ: ENOSYS so libc falls back to the inspectable clone()/openat().
    enosys = ("clone3", "openat2")
    assert {r.errno for r in HARDENING if r.syscall not in enosys} == {errno.EPERM}
    assert [r.errno for r in HARDENING if r.syscall in enosys] == [errno.ENOSYS] * 2
    # every mode-setting syscall has a setuid and a setgid rule on its mode argument
    for syscall, mode_arg, flags_arg in MODE_SETTERS:
        rules = [r for r in HARDENING if r.syscall == syscall]
        bits = {a.value for r in rules for a in r.args if a.index == mode_arg}
        assert bits == {S_ISUID, S_ISGID}, syscall
        if flags_arg is not None:  # only when the call creates
            assert all(any(a.index == flags_arg for a in r.args) for r in rules), syscall


from hypothesis import given, settings, strategies as st  # noqa: E402 - the property tests below need hypothesis; the table tests above do not

_values = st.one_of(st.text(max_size=12), st.integers(), st.booleans(),
                    st.lists(st.sampled_from([*ACTIONS, "x.y", ""]), max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["policy_id", "policy_version", "default_action",
                                        "deny_actions", "extra"]), _values))
def test_any_document_parses_or_is_refused_in_one_line(doc):
    import tomllib

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "[" + ", ".join(toml_value(x) for x in v) + "]"

    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in doc.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # control characters etc.: not a document this test is about
    try:
        pol = parse_policy(text.encode(), "/p.toml")
    except SeccompError as exc:
        assert "\n" not in str(exc) and "/p.toml" in str(exc)
        return
    assert set(pol.deny_actions) <= set(ACTIONS) and "extra" not in doc

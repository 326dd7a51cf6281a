"""Artifact layout, metadata and verification before every use (DESIGN §10)."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from seccomp_support import write_policy

from firma.core.model import SeccompPolicyRef
from firma.errors import SeccompError
from firma.seccomp.store import compile_bpf, open_verified, prepare_filter
from firma.core.seccomp_policy import DEFAULT_POLICY_VERSION, default_policy


def test_layout_and_metadata(state_root, machine):
    art = prepare_filter(None, state_root, machine)
    d = os.path.join(state_root, "seccomp-artifacts", "firma-default", DEFAULT_POLICY_VERSION, art.arch)
    assert art.path == os.path.join(d, "policy.bpf")
    assert art.metadata_path == os.path.join(d, "policy.metadata.json")
    data = open(art.path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == art.sha256
    meta = json.loads(open(art.metadata_path).read())
    assert meta["bpf_sha256"] == art.sha256 and meta["arch"] == art.arch
    assert meta["source_sha256"] == default_policy().source_sha256
    assert {"ptrace", "io_uring_setup", "socket", "ioctl", "mount"} <= set(meta["syscalls"])
    for p in (art.path, art.metadata_path):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_compilation_is_deterministic_and_reused(state_root, machine):
    a = prepare_filter(None, state_root, machine)
    mtime = os.stat(a.path).st_mtime_ns
    b = prepare_filter(None, state_root, machine)
    assert a == b and os.stat(b.path).st_mtime_ns == mtime
    assert compile_bpf(default_policy(), machine) == open(a.path, "rb").read()


def test_open_verified_returns_fd_at_zero_with_the_program(state_root, machine):
    art = prepare_filter(None, state_root, machine)
    fd = open_verified(art)
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert hashlib.sha256(os.read(fd, 1 << 20)).hexdigest() == art.sha256
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


def _refuses(art, match):
    with pytest.raises(SeccompError, match=match) as info:
        os.close(open_verified(art))
    assert "\n" not in str(info.value)


def test_tampered_bpf_refuses(state_root, machine):
    art = prepare_filter(None, state_root, machine)
    data = bytearray(open(art.path, "rb").read())
    data[-1] ^= 0xFF
    open(art.path, "wb").write(bytes(data))
    _refuses(art, "sha256 .* does not match")
    with pytest.raises(SeccompError):
        prepare_filter(None, state_root, machine)


def test_tampered_metadata_refuses(state_root, machine):
    art = prepare_filter(None, state_root, machine)
    meta = json.loads(open(art.metadata_path).read())
    meta["syscalls"].remove("ptrace")
    open(art.metadata_path, "w").write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _refuses(art, "metadata .* does not match")


@pytest.mark.parametrize("which", ["bpf", "metadata", "dir"])
def test_group_writable_refuses(state_root, machine, which):
    art = prepare_filter(None, state_root, machine)
    target = {"bpf": art.path, "metadata": art.metadata_path,
              "dir": os.path.dirname(art.path)}[which]
    os.chmod(target, 0o620 if which != "dir" else 0o770)
    _refuses(art, "group/other-writable")


def test_symlinked_artifact_refuses(state_root, machine, tmp_path):
    art = prepare_filter(None, state_root, machine)
    real = tmp_path / "elsewhere.bpf"
    real.write_bytes(open(art.path, "rb").read())  # identical bytes: only the link is wrong
    real.chmod(0o600)
    os.unlink(art.path)
    os.symlink(real, art.path)
    _refuses(art, "is a symlink")


def test_symlinked_directory_refuses(state_root, machine, tmp_path):
    art = prepare_filter(None, state_root, machine)
    arch_dir = os.path.dirname(art.path)
    moved = tmp_path / "moved"
    os.rename(arch_dir, moved)
    os.symlink(moved, arch_dir)
    _refuses(art, "is a symlink")


def test_foreign_owner_refuses(state_root, machine):
    if os.geteuid() != 0:
        pytest.fail("this test changes file ownership and must run as root (CI runs as root)")
    art = prepare_filter(None, state_root, machine)
    os.chown(art.path, 4242, 4242)
    _refuses(art, "owned by uid 4242")


def test_project_policy_in_its_artifact_dir(tmp_path, state_root, machine):
    pol = write_policy(tmp_path / "p.toml", ["credential.write"], policy_id="team", version="7")
    adir = tmp_path / "artifacts"
    art = prepare_filter(SeccompPolicyRef(str(pol), str(adir)), state_root, machine)
    assert art.path == str(adir / "team" / "7" / art.arch / "policy.bpf")
    meta = json.loads(open(art.metadata_path).read())
    assert meta["source_sha256"] == hashlib.sha256(pol.read_bytes()).hexdigest()
    assert meta["deny_actions"] == ["credential.write"] and "setresuid" in meta["syscalls"]
    assert not os.path.exists(os.path.join(state_root, "seccomp-artifacts", "team"))


def test_changed_source_without_version_bump_refuses(tmp_path, state_root, machine):
    pol = write_policy(tmp_path / "p.toml", ["credential.write"])
    ref = SeccompPolicyRef(str(pol), "")
    prepare_filter(ref, state_root, machine)
    write_policy(pol, ["credential.write", "filesystem.delete"])
    with pytest.raises(SeccompError, match="policy_version"):
        prepare_filter(ref, state_root, machine)
    write_policy(pol, ["credential.write", "filesystem.delete"], version="2")
    assert prepare_filter(ref, state_root, machine).policy_version == "2"


def test_compile_failure_refuses(state_root):
    with pytest.raises(SeccompError, match="unsupported machine architecture 'vax'"):
        prepare_filter(None, state_root, "vax")


def test_policy_errors_refuse(tmp_path, state_root, machine):
    with pytest.raises(SeccompError, match="cannot be read"):
        prepare_filter(SeccompPolicyRef(str(tmp_path / "missing.toml"), ""), state_root, machine)
    bad = tmp_path / "bad.toml"
    bad.write_text('policy_id = "a"\npolicy_version = "1"\ndefault_action = "allow"\n'
                   'deny_actions = ["x.y"]\n')
    with pytest.raises(SeccompError, match="unknown action 'x.y'"):
        prepare_filter(SeccompPolicyRef(str(bad), ""), state_root, machine)
    link = tmp_path / "link.toml"
    link.symlink_to(write_policy(tmp_path / "ok.toml", []))
    with pytest.raises(SeccompError, match="cannot be read"):
        prepare_filter(SeccompPolicyRef(str(link), ""), state_root, machine)


def test_artifact_root_through_symlink_refuses(tmp_path, machine):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "via").symlink_to(real)
    with pytest.raises(SeccompError, match="goes through a symlink"):
        prepare_filter(None, str(tmp_path / "via"), machine)


def test_cross_arch_compiles(state_root):
    other = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    art = prepare_filter(None, state_root, other)
    assert art.arch == other and os.path.getsize(art.path) > 0


def test_libseccomp_rejection_names_the_syscall():
    from firma.core.seccomp_policy import Rule

    class Broken:
        policy_id, policy_version = "x", "1"

        def rules(self):
            return (Rule("ptrace"), Rule("no_such_syscall"))

    with pytest.raises(SeccompError, match="failed at syscall 'no_such_syscall'"):
        compile_bpf(Broken(), "x86_64")

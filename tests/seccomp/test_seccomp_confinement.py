"""Real confinement: the compiled filter, applied by bwrap, blocks each hardening entry.

Two positive controls per probe: the same call succeeds outside any sandbox, and inside the same
bwrap sandbox without the filter (so a refusal measures the filter, not a missing capability)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from seccomp_support import HARDENING_TESTS, SETID_TESTS, sandbox_argv, write_policy

from firma.core.model import SeccompPolicyRef
from firma.seccomp.store import open_verified, prepare_filter

pytestmark = pytest.mark.confinement
EPERM = str(errno.EPERM)


def _filtered(run_probe, artifact, tests, prefix=()):
    fd = open_verified(artifact)
    try:
        return run_probe(tests, seccomp_fd=fd, prefix=prefix)
    finally:
        os.close(fd)


def test_hardening_blocks_each_entry_with_eperm(run_probe, state_root, machine):
    outside = run_probe(HARDENING_TESTS, sandbox=False)
    assert outside.done, outside.stderr
    assert outside.results == {t: "0" for t in HARDENING_TESTS}
    bare = run_probe(HARDENING_TESTS)
    assert bare.done, bare.stderr
    assert bare.results == {t: "0" for t in HARDENING_TESTS}

    art = prepare_filter(None, state_root, machine)
    confined = _filtered(run_probe, art, HARDENING_TESTS)
    assert confined.started and confined.done, confined.stderr
    assert confined.results == {t: EPERM for t in HARDENING_TESTS}


def test_no_call_can_set_setuid_or_setgid_bits(run_probe, state_root, machine):
    tests = (*SETID_TESTS, "chmod_plain", "openat2")
    # Without the filter the bits really land, outside and inside the sandbox — except mkdir's,
    # which Linux drops itself (a directory gets setgid only from its parent); the rule stays for
    # filesystems that might not.
    landed = {t: "0" for t in tests} | {"mkdir_sgid": "203"}
    outside = run_probe(tests, sandbox=False)
    assert outside.done, outside.stderr
    assert outside.results == landed
    assert run_probe(tests).results == landed
    confined = _filtered(run_probe, prepare_filter(None, state_root, machine), tests)
    assert confined.done, confined.stderr
    assert confined.results == {**{t: EPERM for t in SETID_TESTS}, "chmod_plain": "0",
                                "openat2": str(errno.ENOSYS)}


def test_foreign_architecture_syscall_kills_the_process(run_probe, state_root, machine):
    if machine != "x86_64":
        pytest.fail(f"the i386 entry-point probe exists only for x86_64 hosts (this is {machine})")
    assert run_probe(["int80"], sandbox=False).results == {"int80": "0"}
    assert run_probe(["int80"]).results == {"int80": "0"}
    confined = _filtered(run_probe, prepare_filter(None, state_root, machine), ["int80"])
    assert confined.done
    assert confined.results == {"int80": f"signal:{int(signal.SIGSYS)}"}


def test_x32_abi_syscall_kills_the_process(run_probe, state_root, machine):
    if machine != "x86_64":
        pytest.fail(f"the x32 probe exists only for x86_64 hosts (this is {machine})")
    # Without the filter the kernel answers (ENOSYS when x32 is compiled out), nobody dies.
    assert "signal" not in run_probe(["x32"]).results["x32"]
    confined = _filtered(run_probe, prepare_filter(None, state_root, machine), ["x32"])
    assert confined.results == {"x32": f"signal:{int(signal.SIGSYS)}"}


def test_unshare_command_fails_inside(run_probe, state_root, machine):
    assert run_probe(["unshare_cli"], sandbox=False).results == {"unshare_cli": "0"}
    assert run_probe(["unshare_cli"]).results == {"unshare_cli": "0"}
    confined = _filtered(run_probe, prepare_filter(None, state_root, machine), ["unshare_cli"])
    assert confined.done and confined.results["unshare_cli"] not in ("0", "127")


def test_default_filter_leaves_ordinary_calls_alone(run_probe, state_root, machine):
    tests = ["setuid", "execve", "execveat", "unlink"]
    confined = _filtered(run_probe, prepare_filter(None, state_root, machine), tests)
    assert confined.results == {t: "0" for t in tests}


def test_credential_write_policy_blocks_setuid_family(run_probe, state_root, machine, tmp_path):
    assert run_probe(["setuid"], sandbox=False).results == {"setuid": "0"}
    assert run_probe(["setuid"]).results == {"setuid": "0"}
    pol = write_policy(tmp_path / "p.toml", ["credential.write"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)
    confined = _filtered(run_probe, art, ["setuid", "unlink", *HARDENING_TESTS])
    assert confined.results["setuid"] == EPERM
    assert confined.results["unlink"] == "0"
    # The hardening list applies to project policies too.
    assert all(confined.results[t] == EPERM for t in HARDENING_TESTS)


def test_filesystem_delete_policy_blocks_unlink(run_probe, state_root, machine, tmp_path):
    assert run_probe(["unlink"]).results == {"unlink": "0"}
    pol = write_policy(tmp_path / "p.toml", ["filesystem.delete"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)
    assert _filtered(run_probe, art, ["unlink"]).results == {"unlink": EPERM}


def test_system_execute_policy_starts_initial_command_then_denies_exec(
    run_probe, state_root, machine, tmp_path
):
    pol = write_policy(tmp_path / "p.toml", ["system.execute"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)
    assert art.exec_gate and art.command_prefix
    tests = ["execve", "execveat", "tiocsti"]
    # Positive control: same sandbox, same gate prefix, no execute deny → exec works.
    default = prepare_filter(None, state_root, machine)
    control = _filtered(run_probe, default, tests[:2])
    assert control.results == {"execve": "0", "execveat": "0"}

    confined = _filtered(run_probe, art, tests, prefix=art.command_prefix)
    # The initial command ran (its evidence file exists) …
    assert confined.started and confined.done, confined.stderr
    # … but nothing it starts can exec, whichever entry point it uses.
    assert confined.results == {"execve": EPERM, "execveat": EPERM, "tiocsti": EPERM}


def test_exec_gate_refuses_missing_command(run_probe, state_root, machine, tmp_path, probe_dir):
    import subprocess

    pol = write_policy(tmp_path / "p.toml", ["system.execute"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)
    out = subprocess.run([*art.command_prefix, "no-such-command-xyz"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 127
    assert "command not found" in out.stderr
    # The gate runs on a system interpreter with the stdlib only (firma's venv may be masked).
    assert art.command_prefix[0].startswith(("/usr/", "/bin/")) and "-S" in art.command_prefix


def test_exec_gate_keeps_exit_status_and_stdio(state_root, machine, tmp_path):
    import subprocess

    pol = write_policy(tmp_path / "p.toml", ["system.execute"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)

    import firma

    # Hide firma's install and the venv's base interpreter, as the bwrap backend does for root.
    hidden = ["--tmpfs", "/root", "--tmpfs", str(Path(firma.__file__).resolve().parents[2])]

    def sh(script):
        fd = open_verified(art)
        try:
            return subprocess.run([*sandbox_argv(), *hidden, "--seccomp", str(fd),
                                   *art.command_prefix,
                                   "sh", "-c", script], pass_fds=(fd,), capture_output=True,
                                  text=True, timeout=60)
        finally:
            os.close(fd)

    out = sh("echo hello; exit 7")
    assert (out.returncode, out.stdout) == (7, "hello\n")
    # The shell started, but a command it runs cannot be executed.
    out = sh("/bin/true; echo status=$?")
    assert "status=126" in out.stdout and "Operation not permitted" in out.stderr


def test_exec_gate_starts_env_shebang_scripts(state_root, machine, tmp_path):
    """Agent CLIs are usually `#!/usr/bin/env node` scripts: they must still start."""
    import subprocess

    pol = write_policy(tmp_path / "p.toml", ["system.execute"])
    art = prepare_filter(SeccompPolicyRef(str(pol), ""), state_root, machine)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "agent"
    script.write_text('#!/usr/bin/env sh\necho "ran $0 $1"\n/bin/true || echo exec-denied\n')
    script.chmod(0o755)
    fd = open_verified(art)
    try:
        out = subprocess.run([*sandbox_argv([(bindir, bindir, False)]), "--setenv", "PATH",
                              f"{bindir}:/usr/bin:/bin", "--seccomp", str(fd),
                              *art.command_prefix, "agent", "arg1"],
                             pass_fds=(fd,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert out.stdout.splitlines() == [f"ran {script} arg1", "exec-denied"], out.stderr

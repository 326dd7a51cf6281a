"""Fixtures for the seccomp tests: the compiled C probe and a bare-bwrap sandbox runner."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PROBE_SRC = Path(__file__).with_name("probe.c")

# Every hardening entry the probe exercises.
HARDENING_TESTS = (
    "tiocsti", "tiocsti_hibits", "io_uring", "ptrace", "process_vm_writev", "unshare_net",
    "clone_newnet", "setns", "mount", "af_packet", "af_packet_hibits", "userfaultfd", "add_key",
)
# Every way the probe asks for a setuid/setgid mode (EPERM under the filter), and the control
# that an ordinary chmod still works.
SETID_TESTS = (
    "chmod_suid", "chmod_sgid", "fchmod_suid", "fchmodat_sgid", "fchmodat2_suid", "open_creat_suid",
    "openat_creat_sgid", "creat_suid", "mkdir_sgid", "mknod_suid", "tmpfile_suid",
)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required for the seccomp confinement tests; run "
                    "scripts/install-system-deps.sh")
    return path


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seccomp-probe")
    d.chmod(0o755)
    gcc = _need("gcc")
    subprocess.run([gcc, "-O1", "-Wall", "-o", str(d / "probe"), str(PROBE_SRC)], check=True)
    return d


@dataclass
class ProbeRun:
    returncode: int
    results: dict[str, str]
    started: bool
    done: bool
    stderr: str


def read_evidence(path: Path) -> tuple[dict[str, str], bool, bool]:
    results: dict[str, str] = {}
    started = done = False
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("started"):
                started = True
            elif line == "done":
                done = True
            else:
                name, value = line.split(" ", 1)
                results[name] = value
    return results, started, done


def sandbox_argv(binds=()) -> list[str]:
    """The bare bwrap sandbox the probes run in (no --disable-userns: see run_probe)."""
    argv = [_need("bwrap"), "--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000",
            "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "--tmpfs", "/tmp"]
    for src, dst, rw in binds:
        argv += ["--bind" if rw else "--ro-bind", str(src), str(dst)]
    return argv


@pytest.fixture
def run_probe(probe_dir, tmp_path):
    """run_probe(tests, seccomp_fd=None, sandbox=True, prefix=()) -> ProbeRun.

    The sandbox is bwrap with every namespace unshared and a non-root uid, but *without*
    --disable-userns, so that in-sandbox controls show what the filter alone blocks."""
    counter = iter(range(1000))

    def run(tests, seccomp_fd: int | None = None, sandbox: bool = True, prefix=()) -> ProbeRun:
        evdir = tmp_path / f"ev{next(counter)}"
        evdir.mkdir()
        evdir.chmod(0o777)
        ev = evdir / "evidence"
        cmd = [*prefix, str(probe_dir / "probe"), str(ev), *tests]
        fds = ()
        if sandbox:
            argv = sandbox_argv([(probe_dir, probe_dir, False), (evdir, evdir, True)])
            if seccomp_fd is not None:
                argv += ["--seccomp", str(seccomp_fd)]
                fds = (seccomp_fd,)
            cmd = argv + cmd
        proc = subprocess.run(cmd, pass_fds=fds, capture_output=True, text=True, timeout=60)
        results, started, done = read_evidence(ev)
        return ProbeRun(proc.returncode, results, started, done, proc.stderr)

    return run


@pytest.fixture
def machine() -> str:
    return platform.machine()


@pytest.fixture
def state_root(tmp_path) -> str:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return str(d)


def write_policy(path: Path, actions, policy_id="proj", version="1") -> Path:
    acts = ", ".join(f'"{a}"' for a in actions)
    path.write_text(f'policy_id = "{policy_id}"\npolicy_version = "{version}"\n'
                    f'default_action = "allow"\ndeny_actions = [{acts}]\n')
    return path


def errno_name(value: str) -> str:
    import errno as _e
    return _e.errorcode.get(int(value), value) if value.isdigit() else value



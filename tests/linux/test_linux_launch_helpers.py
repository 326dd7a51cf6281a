"""The stand-ins firma uses on the launch path instead of heavier stdlib imports behave like the
originals they replace: host.which like shutil.which, privfs.remove_tree like shutil.rmtree
(without following links), the pyseccomp import without ctypes.util leaving no trace, the agent
getting no descriptor or ignored signal from firma's caller, and the `firma` executable keeping
OpenSSL's Python modules out while a run still signs its audit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from firma.seccomp import store as seccomp
from firma import privfs
from firma.host import which
from linux_support import searchable, base_env, firma_cmd

# `sh -c` probe: the shell's ignored-signal mask, then (exec'd, so exactly the descriptors the
# shell was given, less close-on-exec ones) the open descriptors, less the listing's own.
FD_SIG_PROBE = (
    "grep SigIgn /proc/$$/status; exec python3 -S -c \"import os\n"
    "def is_open(x):\n"
    "    try:\n"
    "        return bool(os.readlink('/proc/self/fd/' + x))\n"
    "    except OSError:\n"
    "        return False\n"
    "print(*sorted(int(x) for x in os.listdir('/proc/self/fd') if is_open(x)))\""
)


def _fd_sig(out: str) -> tuple[set[int], int]:
    sig, fds = out.strip().split("\n")
    return {int(x) for x in fds.split()}, int(sig.split()[1], 16)


def test_agent_gets_no_descriptor_firma_inherited_and_no_ignored_signal(ws, tmp_path):
    """A descriptor left inheritable by firma's caller never reaches the agent (bwrap passes
    along whatever it inherits), and neither does an ignored SIGPIPE (Python ignores it for
    itself; the agent gets the caller's other dispositions, as with any launcher). Control: the
    same probe started the same way outside firma sees both."""
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        def start(argv):
            return subprocess.run(argv, cwd=ws, env=base_env(tmp_path), pass_fds=(fd,), restore_signals=False,
                                  capture_output=True, text=True, timeout=60)

        ctl = start(["sh", "-c", FD_SIG_PROBE])
        cfds, cignored = _fd_sig(ctl.stdout)
        assert fd in cfds and cignored & (1 << (signal.SIGPIPE - 1))
        p = start(firma_cmd("run", "--", "sh", "-c", FD_SIG_PROBE))
        assert p.returncode == 0, p.stderr
        fds, ignored = _fd_sig(p.stdout)
        python_own = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
        assert fds == {0, 1, 2} and ignored == cignored & ~python_own
    finally:
        os.close(fd)


@pytest.fixture
def bindirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tool").write_text("#!/bin/sh\n")  # not executable: skipped
    (b / "tool").write_text("#!/bin/sh\n")
    (b / "tool").chmod(0o755)
    (a / "dir").mkdir()  # a directory is never a match
    (b / "only").write_text("")
    (b / "only").chmod(0o755)
    return a, b


@pytest.mark.parametrize("name", ["tool", "dir", "only", "missing", "sh"])
@pytest.mark.parametrize("path_kind", ["both", "reversed", "empty", "with-empty-entry"])
def test_which_matches_shutil_which(bindirs, name, path_kind, monkeypatch, tmp_path):
    a, b = bindirs
    path = {
        "both": f"{a}{os.pathsep}{b}",
        "reversed": f"{b}{os.pathsep}{a}",
        "empty": "",
        "with-empty-entry": f"{a}{os.pathsep}{os.pathsep}/usr/bin",
    }[path_kind]
    monkeypatch.chdir(b)  # an empty entry means the current directory
    assert which(name, path) == shutil.which(name, path=path)
    assert which(str(b / "tool"), "") == shutil.which(str(b / "tool"), path="") == str(b / "tool")


def test_remove_tree_unlinks_files_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for n in ("owner", "run.log", "resolv.conf"):
        (run / n).write_text(n)
    (run / "link-to-dir").symlink_to(outside)
    (run / "link-to-file").symlink_to(outside / "keep")
    privfs.remove_tree(str(run))
    assert not run.exists()
    assert (outside / "keep").read_text() == "precious"  # control: the link targets survive


def test_remove_tree_falls_back_for_nested_dirs(tmp_path):
    run = tmp_path / "run"
    (run / "sub" / "deeper").mkdir(parents=True)
    (run / "sub" / "deeper" / "f").write_text("x")
    (run / "f").write_text("x")
    privfs.remove_tree(str(run))
    assert not run.exists()
    privfs.remove_tree(str(run))  # already gone: no error


def test_pyseccomp_imports_without_ctypes_util():
    code = (
        "import sys\n"
        "from firma.seccomp import store as seccomp\n"
        "m = seccomp._import_pyseccomp()\n"
        "import ctypes\n"
        "print(m._libseccomp_path, 'ctypes.util' in sys.modules, hasattr(ctypes, 'util'), 'tempfile' in sys.modules)\n"
        "import ctypes.util\n"
        "print(ctypes.util.find_library.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "libseccomp.so.2 False False False"  # loaded by soname, no stand-in left behind
    assert out[1] == "ctypes.util"  # the real module imports normally afterwards
    # the compiled filter is the same as with the regular lookup (the artifact tests compare bytes)
    assert seccomp._import_pyseccomp().system_arch() is not None


def test_firma_executable_keeps_openssl_modules_out_and_still_signs(ws, tmp_path):
    """`python -m firma` (cli.entry) runs an agent that sends a request: the audit line is signed
    and verifies; neither the launcher nor the services process it forks ever imported ssl or
    _hashlib, and the launcher never imported asyncio (checked from a sitecustomize hook that
    reports each process's modules as it exits, by atexit or os._exit)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    reports = tmp_path / "modules"
    reports.mkdir()
    # a root caller's rlimits helper is a fork of the launcher running as the agent's uid
    reports.chmod(0o1777)
    searchable(reports)
    (hook / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        "def dump():\n"
        f"    open(os.path.join({str(reports)!r}, str(os.getpid())), 'w').write(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)))\n"
        "atexit.register(dump)\n"
        "_exit = os._exit\n"
        "def exit_reporting(code):\n"
        "    dump()\n"
        "    _exit(code)\n"
        "os._exit = exit_reporting\n"
    )
    env = base_env(tmp_path, PYTHONPATH=str(hook))
    p = subprocess.run(
        [sys.executable, "-m", "firma", "run", "--", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/18080; "
         "printf 'GET http://denied.invalid/ HTTP/1.1\\r\\nHost: denied.invalid\\r\\n\\r\\n' >&3; head -c 12 <&3"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("HTTP/1.1 403")
    seen = [set(json.loads(f.read_text())) for f in reports.iterdir()]
    launchers = [m for m in seen if "firma.run.forked" in m and "firma.services.sidecar" not in m]
    services = [m for m in seen if "firma.services.sidecar" in m]
    # the hook saw the launcher (and its planting helper, a fork of it) and the services process
    assert launchers and len(services) == 1, [len(m) for m in seen]
    assert all("asyncio" not in m for m in launchers) and "asyncio" in services[0]
    for modules in seen:
        assert "ssl" not in modules and "_hashlib" not in modules
    audit = os.path.join(env["FIRMA_STATE_DIR"], "audit.jsonl")
    v = subprocess.run([sys.executable, "-m", "firma", "audit", "verify", audit], env=env, capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    with open(audit) as f:
        assert any(json.loads(line)["deny_reason"] for line in f)


def test_drive_runs_a_coroutine_that_never_suspends_and_refuses_one_that_does():
    """The forked hosting runs the one launch sequence without an event loop."""
    import types

    from firma.run.sequence import drive

    async def step(x):
        return x + 1

    async def steps():
        return await step(1) + await step(2)

    assert drive(steps()) == 5

    @types.coroutine
    def suspend():
        yield

    async def suspends():
        await suspend()

    with pytest.raises(RuntimeError, match="suspended"):
        drive(suspends())


def test_bwrap_opens_only_the_envelopes_own_seccomp_artifact(tmp_path):
    """The artifact travels in the envelope; a filter path that is not that artifact's is refused
    (never opened unverified), and a bare path (a runner's) gets the owner and mode checks."""
    from firma.backends.bwrap.backend import open_seccomp
    from firma.core.model import (ExecutionEnvelope, IdentityMode, NetworkEndpoints, SeccompArtifactRef)
    from firma.errors import SeccompError

    bpf = tmp_path / "other.bpf"
    bpf.write_bytes(b"\0" * 8)
    bpf.chmod(0o600)
    ref = SeccompArtifactRef(path=str(tmp_path / "a" / "policy.bpf"), sha256="0" * 64, root=str(tmp_path),
                             policy_id="p", policy_version="1", arch="x", metadata_path="m", metadata=b"")

    def envelope(path, artifact):
        return ExecutionEnvelope(
            sandbox_id="sbx_1", runtime_dir=str(tmp_path), executable="true", args=(), cwd=str(tmp_path), env={},
            identity_mode=IdentityMode.SANDBOX_USER, home=str(tmp_path), seccomp_filter_path=path, mounts=(),
            mask_home_paths=(), network=NetworkEndpoints(None, None), seccomp_artifact=artifact)

    with pytest.raises(SeccompError, match="is not the envelope's artifact"):
        open_seccomp(envelope(str(bpf), ref))
    fd = open_seccomp(envelope(str(bpf), None))
    os.close(fd)
    bpf.chmod(0o620)
    with pytest.raises(SeccompError, match="not writable by group or others"):
        open_seccomp(envelope(str(bpf), None))
    assert open_seccomp(envelope(None, None)) is None


def test_mask_verification_reads_the_mount_table_and_refuses_gaps():
    """The backend checks planned masks against a real mountinfo (here: this process's)."""
    import os
    import types

    from firma.backends.bwrap.verify import mount_table, unescape, verify_masks
    from firma.errors import LaunchError

    checks = []
    hooks = types.SimpleNamespace(add_check=checks.append)
    top = mount_table(os.getpid())  # this process's own mount table
    ok_plan = types.SimpleNamespace(masked=("/proc",))
    verify_masks(top, ok_plan, hooks.add_check)
    assert checks[-1].ok
    bad_plan = types.SimpleNamespace(masked=("/proc", "/definitely/not/a/mount"))
    with pytest.raises(LaunchError, match="not masked as planned: /definitely/not/a/mount"):
        verify_masks(top, bad_plan, hooks.add_check)
    assert not checks[-1].ok
    assert unescape(r"/a\040b\012c\134d") == "/a b\nc\\d"


def test_planting_waits_for_the_loopback_address_instead_of_failing():
    """bwrap reports the sandbox's pid before its child has finished setting up `lo`; planting then
    failed with EADDRNOTAVAIL (an intermittent launch failure under load). Here a namespace's `lo`
    is up without 127.0.0.1, and the address arrives 0.3 s after planting starts: planting waits
    and succeeds. Control: a bind in that namespace before the address exists fails with
    EADDRNOTAVAIL."""
    import subprocess
    import time

    from firma.backends.bwrap.planting import Addresses, plant

    if os.geteuid() != 0:
        pytest.fail("needs root to make a user+network namespace with unshare -r (CI runs as root)")
    ns = subprocess.Popen(["unshare", "-Urn", "sh", "-c",
                           "ip link set lo up; ip addr del 127.0.0.1/8 dev lo; read go; ip addr add 127.0.0.1/8 dev lo; sleep 30"],
                          stdin=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        probe = subprocess.run(["nsenter", "-t", str(ns.pid), "-U", "-n", "--preserve-credentials", "python3", "-c",
                                "import socket; s = socket.socket()\n"
                                "try:\n    s.bind(('127.0.0.1', 18080)); print('bound')\n"
                                "except OSError as e:\n    print(e.errno)"],
                               capture_output=True, text=True, timeout=10)
        assert probe.stdout.strip() == "99", probe.stdout + probe.stderr  # control: EADDRNOTAVAIL while lo is down

        def bring_lo_up_later() -> None:
            time.sleep(0.3)
            ns.stdin.write("go\n")
            ns.stdin.flush()

        import threading

        t = threading.Thread(target=bring_lo_up_later)
        t.start()
        t0 = time.monotonic()
        socks = plant(ns.pid, Addresses())
        waited = time.monotonic() - t0
        t.join()
        try:
            assert socks.proxy_tcp.getsockname() == ("127.0.0.1", 18080)
            assert waited >= 0.2  # it did wait for lo
        finally:
            socks.close()
    finally:
        ns.kill()
        ns.wait()

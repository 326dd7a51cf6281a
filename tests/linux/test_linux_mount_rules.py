"""Config mounts that would open the sandbox are refused before anything starts (ATTACKS #40)."""

from __future__ import annotations

import os
import re

import pytest

from firma.core.model import Mount
from firma.core.mountcheck import check_mounts
from firma.errors import ConfigError
from linux_support import base_env, run_firma

STATE = "/run/user/1000/firma"


def _links(mapping):
    return lambda p: mapping.get(p, p)


@pytest.mark.parametrize(
    "mount, fragment",
    [
        (Mount("/proc", "/mnt/p", True), "exposes the host's /proc or /sys"),
        (Mount("/proc/1/root", "/mnt/p", True), "exposes the host's /proc or /sys"),
        (Mount("/sys/fs/cgroup", "/mnt/c", True), "exposes the host's /proc or /sys"),
        (Mount("/", "/mnt/root", True), "exposes the host's /proc or /sys"),
        (Mount("/data/link-to-proc", "/mnt/p", True), "(or resolves to) /proc"),
        (Mount("/run/user/1000", "/mnt/u", True), "overlaps firma's state root"),
        (Mount("/run/user/1000/firma/proofs", "/mnt/u", True), "overlaps firma's state root"),
        (Mount("/data", "/", False), "the target / is managed"),
        (Mount("/data", "/proc", False), "the target /proc is managed"),
        (Mount("/data", "/dev/shm", False), "the target /dev/shm is managed"),
        (Mount("/data/resolv", "/etc/resolv.conf", True), "the target /etc/resolv.conf is managed"),
        (Mount("/data/passwd", "/etc/passwd/", True), "the target /etc/passwd is managed"),
        (Mount("data", "/mnt/d", True), "must be absolute"),
    ],
)
def test_refused_mounts(mount, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check_mounts([mount], state_root=STATE, realpath=_links({"/data/link-to-proc": "/proc"}))


@pytest.mark.parametrize(
    "mount",
    [
        Mount("/data", "/mnt/data", False),
        Mount("/run/user/1000/other", "/mnt/o", True),  # sibling of the state root, not an ancestor
        Mount("/procfs-backup", "/mnt/b", True),  # a name that merely starts with /proc
        Mount("/data/etc", "/etc/firma-extra", True),
    ],
)
def test_ordinary_mounts_pass(mount):
    check_mounts([mount], state_root=STATE, realpath=_links({}))


def test_firma_run_refuses_a_procfs_mount_and_starts_nothing(ws, tmp_path):
    (ws / ".firma").mkdir()
    target = tmp_path / "mnt"
    target.mkdir()
    (ws / ".firma" / "firma.toml").write_text(
        f'[run]\nmounts = [{{source = "/proc", target = "{target}", read_only = true}}]\n'
    )
    p = run_firma(["run", "--config", f"{ws}/.firma/firma.toml", "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert p.stderr.startswith(f"[ERR]  mount /proc -> {target}: the source is (or resolves to) /proc")
    assert p.stderr.count("\n") == 1
    assert not (ws / "ran").exists()
    # positive control: a harmless mount of the same shape is accepted and visible inside
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("hi")
    (ws / ".firma" / "firma.toml").write_text(
        f'[run]\nmounts = [{{source = "{data}", target = "{target}", read_only = true}}]\n'
    )
    ok = run_firma(["run", "--config", f"{ws}/.firma/firma.toml", "--", "cat", f"{target}/hello"], cwd=ws, env=base_env(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hi"
    assert os.path.exists(ws / ".firma" / "firma.toml")


def test_bwrap_refusing_a_mount_is_reported_as_such(ws, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (ws / ".firma").mkdir()
    # / is read-only inside, so bwrap cannot create this target's parents
    (ws / ".firma" / "firma.toml").write_text(
        f'[run]\nmounts = [{{source = "{data}", target = "/nonexistent-firma-test/x", read_only = true}}]\n'
    )
    p = run_firma(["run", "--config", f"{ws}/.firma/firma.toml", "--", "sh", "-c", f"touch {ws}/ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1
    assert "/nonexistent-firma-test/x" in p.stderr  # bwrap's own reason
    assert p.stderr.splitlines()[-1] == (
        "[ERR]  bwrap could not build the sandbox (its reason is printed above); "
        "fix the mount or path it names, then rerun"
    )
    assert not (ws / "ran").exists()


_LATE_READ = r'''
import os, sys, time
import firma.backends.bwrap.backend as backend
read = backend.netns_interfaces
def late(pid):
    end = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}/net/dev") and time.monotonic() < end:
        time.sleep(0.005)  # read only once bwrap's init is gone, as a slow launcher would
    return read(pid)
backend.netns_interfaces = late
from firma.cli.main import entry
sys.argv = ["firma", *sys.argv[1:]]
sys.exit(entry())
'''


def test_bwrap_giving_up_before_the_launcher_reads_the_sandbox_is_reported_as_such(ws, tmp_path):
    """The same refusal when the launcher reads the sandbox's network only after bwrap's init
    is gone: still bwrap's one-line reason and firma's line about it, not a traceback."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "mount.toml"
    cfg.write_text(f'[run]\nmounts = [{{source = "{data}", target = "/nonexistent-firma-test/x", read_only = true}}]\n')
    p = subprocess.run([sys.executable, "-c", _LATE_READ, "run", "--config", str(cfg), "--", "sh", "-c", f"touch {ws}/ran"],
                       cwd=ws, env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "/nonexistent-firma-test/x" in p.stderr
    assert p.stderr.splitlines()[-1].startswith("[ERR]  bwrap could not build the sandbox"), p.stderr
    assert not (ws / "ran").exists()

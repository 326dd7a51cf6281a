"""Reads the real platform once, into a `Host` value (firma.core.hostfacts): the only module that
inspects it. Backends and the launch sequence never look at the platform or the environment
themselves."""

from __future__ import annotations

import os
import subprocess
from typing import Mapping

from .core.hostfacts import Host


def _read(path: str) -> str | None:
    try:
        with open(path) as f:  # not pathlib: launch latency (pathlib + urllib.parse imports)
            return f.read().strip()
    except OSError:
        return None


# Where firma looks for the host binaries it runs (bwrap, the exec gate's python3, sandbox-exec):
# fixed system directories only, never PATH, whose entries may be relative, empty, or a
# directory the agent wrote in an earlier run (a workspace venv's bin/). `[host].<name>` in
# trusted configuration names another absolute path.
SYSTEM_BIN_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/local/sbin")


class UntrustedBinary(Exception):
    """A host binary that fails the trusted-binary rule; the message says why, in one line."""


def check_trusted_binary(path: str) -> None:
    """`path` is absolute, an executable regular file owned by root or the caller and writable by
    no one else, in directories that pass the private-path ancestor rule."""
    from . import privfs  # noqa: PLC0415 - privfs is light, but only needed here

    if not path.startswith("/"):
        raise UntrustedBinary(f"{path} is not an absolute path")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UntrustedBinary(f"{path}: {exc.strerror}") from None
    if not (st.st_mode & 0o170000 == 0o100000) or not os.access(path, os.X_OK):
        raise UntrustedBinary(f"{path} is not an executable file")
    if st.st_uid not in (0, os.geteuid()):
        raise UntrustedBinary(f"{path} is owned by uid {st.st_uid}, not by root or you")
    if st.st_mode & 0o022:
        raise UntrustedBinary(f"{path} is writable by group or others (mode {st.st_mode & 0o7777:04o})")
    try:
        privfs.check_ancestors(os.path.dirname(os.path.realpath(path)), sticky_parent=False)
    except privfs.PrivatePathError as exc:
        raise UntrustedBinary(str(exc)) from None


def find_binary(name: str, configured: str | None) -> tuple[str | None, str | None]:
    """(path, refusal): the configured absolute path, or the first `name` in SYSTEM_BIN_DIRS; a
    candidate failing the trusted-binary rule is refused with the reason (never skipped for a
    later, different one)."""
    candidates = [configured] if configured else [os.path.join(d, name) for d in SYSTEM_BIN_DIRS]
    for p in candidates:
        if configured is None and not os.path.exists(p):
            continue
        try:
            check_trusted_binary(p)
        except UntrustedBinary as exc:
            origin = f"[host].{name}" if configured else "found"
            return None, f"{name} ({origin}) refused: {exc}"
        return p, None
    return None, None


def which(name: str, path: str) -> str | None:
    """shutil.which for POSIX: the first executable regular file called `name` on `path` (a name
    containing "/" is checked as given). Here rather than shutil, whose import (bz2, lzma,
    fnmatch) costs a launch ~3 ms."""
    if "/" not in name and not path:
        return None  # as shutil.which: an empty PATH finds nothing
    for d in [""] if "/" in name else path.split(os.pathsep):
        p = os.path.join(d, name)  # "" (the current directory) joins to the bare name
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def probe_bwrap_version(bwrap_path: str | None) -> str | None:
    if bwrap_path is None:
        return None
    try:
        out = subprocess.run(
            [bwrap_path, "--version"], capture_output=True, encoding="utf-8", errors="replace", timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return (out.stdout.strip().splitlines() or ["bubblewrap"])[0]


def detect_host(environ: Mapping[str, str] | None = None, binaries: Mapping[str, str] | None = None) -> Host:
    """Read the real platform. The only place that inspects it. `binaries`: `[host]` paths from
    trusted configuration (bwrap, python3)."""
    env = dict(os.environ if environ is None else environ)
    binaries = binaries or {}
    refused: dict[str, str] = {}
    bwrap, why = find_binary("bwrap", binaries.get("bwrap"))
    if why:
        refused["bwrap"] = why
    python3, why = find_binary("python3", binaries.get("python3"))
    if why:
        refused["python3"] = why
    # os.uname() is what platform.system()/machine() return on POSIX (launch latency: platform
    # costs an import).
    uname = os.uname()
    return Host(
        system=uname.sysname.lower(),
        machine=uname.machine,
        kernel_osrelease=_read("/proc/sys/kernel/osrelease") or "",
        unprivileged_userns_clone=_read("/proc/sys/kernel/unprivileged_userns_clone"),
        max_user_namespaces=_read("/proc/sys/user/max_user_namespaces"),
        uid=os.getuid(),
        gid=os.getgid(),
        bwrap_path=bwrap,
        bwrap_version=probe_bwrap_version(bwrap),
        sandbox_exec_path=find_binary("sandbox-exec", None)[0] if uname.sysname == "Darwin" else None,
        python3_path=python3,
        refused_binaries=refused,
        environ=env,
    )

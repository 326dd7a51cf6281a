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


def detect_host(environ: Mapping[str, str] | None = None) -> Host:
    """Read the real platform. The only place that inspects it."""
    env = dict(os.environ if environ is None else environ)
    path = env.get("PATH", os.defpath)
    bwrap = which("bwrap", path)
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
        sandbox_exec_path=which("sandbox-exec", path) if uname.sysname == "Darwin" else None,
        environ=env,
    )

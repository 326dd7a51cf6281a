"""Platform facts, gathered once, passed in as a value.

Backends and the lifecycle never look at the platform or the environment themselves: they receive
a `Host`. Tests build a `Host` by hand (for example a macOS host on Linux)."""

from __future__ import annotations

import os
import subprocess
from typing import Mapping

from .core.record import record, field

TRUTHY = frozenset({"1", "true", "yes", "on"})


def is_truthy(value: str | None) -> bool:
    """`1|true|yes|on`, trimmed, any case (ref)."""
    return value is not None and value.strip().lower() in TRUTHY


@record
class Host:
    system: str  # "linux", "darwin", …  (platform.system().lower())
    machine: str = "x86_64"
    kernel_osrelease: str = ""
    # Raw contents of the userns knobs; None when the file does not exist on this kernel.
    unprivileged_userns_clone: str | None = None
    max_user_namespaces: str | None = None
    uid: int = 0
    gid: int = 0
    # Absolute paths of the external tools found on PATH (None when absent).
    bwrap_path: str | None = None
    bwrap_version: str | None = None  # first line of `bwrap --version`, None when it failed
    sandbox_exec_path: str | None = None
    # The user's environment, captured once; the plan reads it, backends never do.
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_linux(self) -> bool:
        return self.system == "linux"

    @property
    def is_macos(self) -> bool:
        return self.system == "darwin"

    @property
    def is_wsl(self) -> bool:
        rel = self.kernel_osrelease.lower()
        return self.is_linux and ("microsoft" in rel or "wsl" in rel)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


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

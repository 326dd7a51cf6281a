"""Reads the real platform once, into a `Host` value (firma.core.hostfacts): the only module that
inspects it. Backends and the launch sequence never look at the platform or the environment
themselves."""

from __future__ import annotations

import os
import subprocess
from typing import Mapping

from .core.hostfacts import Host
from .core.limits import V1, V2, CgroupFacts


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


def mem_total() -> int | None:
    """Host RAM in bytes (MemTotal of /proc/meminfo), None when unreadable."""
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                return None
    return None


_LIMITED = ("memory", "pids", "cpu")


def hard_rlimits() -> dict[str, int | None]:
    """The caller's hard limits the sandbox inherits and firma may lower (None: unlimited)."""
    import resource  # noqa: PLC0415 - only on Linux

    out: dict[str, int | None] = {}
    for name in ("NPROC", "NOFILE", "FSIZE", "DATA"):
        hard = resource.getrlimit(getattr(resource, "RLIMIT_" + name))[1]
        out[name] = None if hard == resource.RLIM_INFINITY else hard
    return out


def cgroup_facts() -> CgroupFacts:
    """Where firma may make a cgroup for a run (DESIGN §5.3): under the launcher's own group, on
    the unified hierarchy when it carries the controllers and the group is delegated to the
    launcher (writable, holding no other process), else in the v1 hierarchies the caller may
    write (root)."""
    from .core import cgroupfs  # noqa: PLC0415 - only on Linux

    groups = cgroupfs.launcher_groups(_read("/proc/self/cgroup") or "", _read("/proc/self/mountinfo") or "")
    why: list[str] = []
    if groups.v2 is not None:
        own = groups.v2
        available = (_read(os.path.join(own, "cgroup.controllers")) or "").split()
        wanted = [c for c in _LIMITED if c in available]
        if not wanted:
            why.append(f"the unified hierarchy carries none of memory, pids, cpu for {own}")
        elif not all(os.access(os.path.join(own, f), os.W_OK) for f in ("", "cgroup.procs", "cgroup.subtree_control")):
            why.append(f"cgroup v2: {own} is not delegated to uid {os.geteuid()} (not writable)")
        else:
            procs = set((_read(os.path.join(own, "cgroup.procs")) or "").split())
            if groups.v2_is_root or procs <= {str(os.getpid())}:
                return CgroupFacts(V2, {c: own for c in wanted}, move_self=not groups.v2_is_root)
            why.append(f"cgroup v2: {own} holds other processes; start firma in its own delegated scope "
                       "(systemd-run --user --scope -p Delegate=yes firma run ...)")
    parents = {c: d for c in _LIMITED if (d := groups.v1.get(c)) and os.access(d, os.W_OK)}
    if parents:
        missing = [c for c in _LIMITED if c not in parents]
        if missing:
            why.append(f"cgroup v1: no writable {', '.join(missing)} hierarchy")
        return CgroupFacts(V1, parents, why_not="; ".join(why))
    if groups.v1:
        why.append(f"cgroup v1: the {', '.join(sorted(groups.v1))} hierarchies are not writable by uid {os.geteuid()}")
    return CgroupFacts(None, {}, why_not="; ".join(why) or "no cgroup hierarchy is mounted")


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
        setsid_path=find_binary("setsid", None)[0] if uname.sysname == "Linux" else None,
        ca_bundle=_ca_bundle(),
        refused_binaries=refused,
        environ=env,
        mem_total=mem_total() if uname.sysname == "Linux" else None,
        cgroups=cgroup_facts() if uname.sysname == "Linux" else CgroupFacts(why_not="not Linux"),
        rlimits=hard_rlimits() if uname.sysname == "Linux" else {},
    )


def _ca_bundle() -> str | None:
    from .castore import system_bundle_path  # noqa: PLC0415 - the candidates are named there

    found = system_bundle_path(os.path.isfile)
    return os.path.realpath(found) if found else None

"""Rules for profile/config mounts (`[run].mounts`), checked before anything starts.

A mount is an opening in the sandbox wall, so some are refused outright (ATTACKS #40): a source
that is the host's procfs or sysfs, or an alias of `/` that contains them; a source that exposes
firma's state root (audit key, proofs, run directories); a target that replaces the sandbox's own
`/`, `/proc`, `/sys`, `/dev` or the generated identity and resolver files. Sources are judged
after resolving symlinks (the caller passes the resolver), so a link to /proc is a /proc source."""

from __future__ import annotations

import posixpath
from typing import Callable, Iterable

from ..errors import ConfigError
from .bwrap_plan import ROOT_SECRETS
from .model import Mount

KERNEL_SOURCES = ("/proc", "/sys", "/dev")
RESERVED_TARGET_TREES = ("/proc", "/sys", "/dev")
GENERATED_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/passwd", "/etc/group")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_problem(m: Mount, *, state_root: str | None, realpath: Callable[[str], str],
                  protected: tuple[str, ...] = ()) -> str | None:
    """Why `m` would weaken the sandbox (one clause), or None. Shared by `[run].mounts` and the
    launch contract's mounts (a runner must refuse what firma refuses)."""
    if not m.source.startswith("/") or not m.target.startswith("/"):
        return "source and target must be absolute paths"
    if ".." in m.source.split("/") or ".." in m.target.split("/"):
        return "source and target must not contain '..'"
    src = posixpath.normpath(realpath(m.source))
    tgt = posixpath.normpath(m.target)
    if src == "/" or any(_within(src, k) for k in KERNEL_SOURCES):
        return f"the source is (or resolves to) {src}, which exposes the host's {_kernel_name(src)}; mount a narrower directory"
    if any(_within(src, s) or _within(s, src) for s in ROOT_SECRETS):
        return f"the source {src} holds or is a root-only secret (password hashes, sudo rules, host keys)"
    if state_root is not None:
        state = posixpath.normpath(realpath(state_root))
        if _within(src, state) or _within(state, src):
            return (f"the source overlaps firma's state root {state} (audit key, proofs); "
                    "mount a directory outside it or move FIRMA_STATE_DIR")
    for p in protected:
        d = posixpath.normpath(realpath(p))
        if _within(src, d) or _within(d, src):
            return (f"the source overlaps {d}, your firma configuration and trust records; the agent could "
                    "write the next run's trusted policy there; mount a directory outside it")
    if tgt == "/" or any(_within(tgt, r) for r in RESERVED_TARGET_TREES) or tgt in GENERATED_FILES:
        return (f"the target {tgt} is managed by the sandbox (/, /proc, /sys, /dev, "
                "resolv.conf, hosts, passwd, group); choose another target")
    return None


def _kernel_name(src: str) -> str:
    return "/proc or /sys" if src == "/" or not src.startswith("/dev") else "/dev"


def check_mounts(
    mounts: Iterable[Mount], *, state_root: str, realpath: Callable[[str], str], protected: tuple[str, ...] = ()
) -> None:
    """Raise ConfigError naming the first mount that would weaken the sandbox."""
    for m in mounts:
        why = mount_problem(m, state_root=state_root, realpath=realpath, protected=protected)
        if why is not None:
            fix = "; fix [run].mounts" if why.startswith("source and") else ""
            raise ConfigError(f"mount {m.source} -> {m.target}: {why}{fix}")

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
from .model import Mount

KERNEL_SOURCES = ("/proc", "/sys")
RESERVED_TARGET_TREES = ("/proc", "/sys", "/dev")
GENERATED_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/passwd", "/etc/group")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_mounts(
    mounts: Iterable[Mount], *, state_root: str, realpath: Callable[[str], str]
) -> None:
    """Raise ConfigError naming the first mount that would weaken the sandbox."""
    state = posixpath.normpath(realpath(state_root))
    for m in mounts:
        what = f"mount {m.source} -> {m.target}"
        if not m.source.startswith("/") or not m.target.startswith("/"):
            raise ConfigError(f"{what}: source and target must be absolute paths; fix [run].mounts")
        src = posixpath.normpath(realpath(m.source))
        tgt = posixpath.normpath(m.target)
        if src == "/" or any(_within(src, k) for k in KERNEL_SOURCES):
            raise ConfigError(
                f"{what}: the source is (or resolves to) {src}, which exposes the host's /proc or "
                "/sys; mount a narrower directory"
            )
        if _within(src, state) or _within(state, src):
            raise ConfigError(
                f"{what}: the source overlaps firma's state root {state} (audit key, proofs); "
                "mount a directory outside it or move FIRMA_STATE_DIR"
            )
        if tgt == "/" or any(_within(tgt, r) for r in RESERVED_TARGET_TREES) or tgt in GENERATED_FILES:
            raise ConfigError(
                f"{what}: the target {tgt} is managed by the sandbox (/, /proc, /sys, /dev, "
                "resolv.conf, hosts, passwd, group); choose another target"
            )

"""Host facts the pure bwrap plan needs (firma.core.bwrap_plan), measured here: what kind each
candidate path is (never following a final link), where links point, the workspace's git
config references, $XDG_RUNTIME_DIR and the state root."""

from __future__ import annotations

import os
import stat

from ... import privfs
from ...core import bwrap_plan
from ...core.hostfacts import Host
from ...core.model import ExecutionEnvelope
from ...core.statelayout import state_root_of_run_dir


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def kind_of(p: str) -> str | None:
    """The kind of `p` itself (lstat: a final symlink is reported, not followed)."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return bwrap_plan.SYMLINK
    return bwrap_plan.DIR if stat.S_ISDIR(st.st_mode) else bwrap_plan.FILE


def _read_small(path: str) -> str | None:
    """A regular file's text (up to GIT_CONFIG_MAX bytes), never through a final symlink."""
    data = privfs.read_regular(path, bwrap_plan.GIT_CONFIG_MAX)
    return None if data is None else data.decode("utf-8", "replace")


def git_refs(cwd: str) -> tuple[str, ...]:
    """Workspace paths the repository's own git config names (core.hooksPath; include.path,
    followed while the included files are in the workspace): hooks there run on the host too."""
    git = os.path.join(cwd, bwrap_plan.GIT_DIR)
    if kind_of(git) != bwrap_plan.DIR:
        return ()
    refs: list[str] = []
    todo, seen = [os.path.join(git, "config")], set[str]()
    while todo and len(seen) < 16:
        cfg = todo.pop()
        if cfg in seen:
            continue
        seen.add(cfg)
        text = _read_small(cfg)
        if text is None:
            continue
        hooks, includes = bwrap_plan.git_config_refs(text, os.path.dirname(cfg), cwd)
        refs += hooks
        for inc in includes:
            if within(inc, cwd):
                refs.append(inc)
                todo.append(inc)
    return tuple(dict.fromkeys(r for r in refs if r != cwd and within(r, cwd)))


def xdg_runtime_dir(host: Host) -> str | None:
    """$XDG_RUNTIME_DIR when it is an absolute path (the sandbox puts a fresh tmpfs there)."""
    xdg = host.environ.get("XDG_RUNTIME_DIR", "").strip()
    return xdg if xdg.startswith("/") else None


def _owners(envelope: ExecutionEnvelope) -> dict[str, tuple[int, int]]:
    """(uid, gid) of the workspace and of each mount source: a root caller's idmap shows that
    owner's files as the agent's."""
    out: dict[str, tuple[int, int]] = {}
    for src in (envelope.cwd, *(m.source for m in envelope.mounts)):
        try:
            st = os.lstat(src)
        except OSError:
            continue
        out[src] = (st.st_uid, st.st_gid)
    return out


def _unsearchable(targets: tuple[str, ...], replaced: tuple[str, ...]) -> tuple[str, ...]:
    """Parents of the sandbox's bind targets that an unprivileged uid cannot search (no o+x), other
    than those the sandbox replaces with its own tmpfs (/tmp, /root, ...): a root caller's agent
    could not reach the workspace through them."""
    bad: list[str] = []
    for target in targets:
        parent = os.path.dirname(target)
        while parent != "/" and parent:
            if not any(within(parent, r) for r in replaced):
                try:
                    if not os.stat(parent).st_mode & 0o001:
                        bad.append(parent)
                except OSError:
                    pass
            parent = os.path.dirname(parent)
    return tuple(dict.fromkeys(bad))


def measure_facts(
    envelope: ExecutionEnvelope, host: Host, protected_extra: tuple[str, ...] = (), memory_limit: int | None = None
) -> bwrap_plan.BwrapFacts:
    """lstat the candidate paths on the host (the plan itself stays pure)."""
    xdg = xdg_runtime_dir(host)
    state_root = state_root_of_run_dir(envelope.runtime_dir)
    kinds: dict[str, str] = {}
    realpaths: dict[str, str] = {}
    refs = git_refs(envelope.cwd)
    for p in bwrap_plan.candidate_paths(envelope, xdg, protected_extra + refs) + (state_root,):
        k = kind_of(p)
        if k is None:
            continue
        kinds[p] = k
        if k == bwrap_plan.SYMLINK:
            real = os.path.realpath(p)
            tk = kind_of(real)
            if tk is not None and tk != bwrap_plan.SYMLINK:
                realpaths[p] = real
                kinds[real] = tk
    resolv_target = None
    if kinds.get("/etc/resolv.conf") == bwrap_plan.SYMLINK:
        resolv_target = os.path.realpath("/etc/resolv.conf")
    owners: dict[str, tuple[int, int]] = {}
    unsearchable: tuple[str, ...] = ()
    if host.is_root:
        owners = _owners(envelope)
        for src in owners:  # the stage needs each source's kind (a file is staged on a file)
            k = kind_of(src)
            if k is not None:
                kinds.setdefault(src, k)
        replaced = bwrap_plan.hidden_dirs(
            home=envelope.home, mask_home_paths=(), caller_is_root=True, xdg_runtime_dir=xdg, state_root=state_root
        )
        unsearchable = _unsearchable((envelope.cwd, *(m.target for m in envelope.mounts)), replaced)
    return bwrap_plan.BwrapFacts(
        mem_total=host.mem_total,
        memory_limit=memory_limit,
        owners=owners,
        unsearchable=unsearchable,
        caller_uid=host.uid,
        caller_gid=host.gid,
        kinds=kinds,
        realpaths=realpaths,
        resolv_conf_target=resolv_target,
        xdg_runtime_dir=xdg,
        state_root=state_root,
        git_refs=refs,
    )



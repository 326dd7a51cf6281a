"""Where the launcher's own cgroups are (DESIGN §5.3). Pure: the text of /proc/self/cgroup and
/proc/self/mountinfo in, the directory of the launcher's group in each hierarchy out.

A process's cgroup path is relative to its hierarchy's root; a mount of that hierarchy shows the
subtree below the mount's root (a container's cgroup namespace mounts its own group as "/"). The
launcher's directory is the mount point plus the path below the mount's root."""

from __future__ import annotations

import posixpath
from typing import Mapping

from .limits import V2, LimitPlan
from .record import field, record

# The controllers firma limits with: memory and pids bound the host's resources, cpu shares it.
V1_CONTROLLERS = ("memory", "pids", "cpu")


@record
class CgroupMount:
    mount_point: str
    root: str  # the hierarchy path the mount shows at its mount point
    fstype: str  # "cgroup" (v1) or "cgroup2"
    controllers: frozenset[str] = frozenset()  # v1: from the super options; v2: empty


@record
class LauncherGroups:
    """The launcher's own group directory, by controller (v1) and on the unified hierarchy (v2)."""

    v1: Mapping[str, str] = field(default_factory=dict)  # controller -> directory
    v2: str | None = None  # the unified hierarchy's directory of the launcher's group
    v2_is_root: bool = False  # the launcher sits in the hierarchy's real root


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """`/proc/<pid>/cgroup`: controller -> path for v1 lines, "" -> path for the v2 line."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            out[""] = path
        else:
            for c in ctrls.split(","):
                out[c] = path
    return out


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 4 <= len(field_) and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts of `/proc/<pid>/mountinfo`, in table order."""
    mounts: list[CgroupMount] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        ctrls = frozenset(o for o in rf[2].split(",") if o in V1_CONTROLLERS) if rf[0] == "cgroup" else frozenset()
        mounts.append(CgroupMount(mount_point=_unescape(lf[4]), root=_unescape(lf[3]), fstype=rf[0], controllers=ctrls))
    return mounts


def _below(path: str, root: str) -> str | None:
    """`path` relative to `root` ("" for root itself), None when it is not below it."""
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return None


def launcher_groups(proc_cgroup: str, mountinfo: str) -> LauncherGroups:
    """The directories of the launcher's groups this mount namespace can reach (the last mount
    of a hierarchy that shows the group wins, as path lookup does)."""
    paths = parse_proc_cgroup(proc_cgroup)
    v1: dict[str, str] = {}
    v2: str | None = None
    v2_root = False
    for m in parse_cgroup_mounts(mountinfo):
        if m.fstype == "cgroup2":
            path = paths.get("")
            rel = _below(path, m.root) if path is not None else None
            if rel is not None:
                v2 = posixpath.join(m.mount_point, rel) if rel else m.mount_point
                v2_root = path == "/" and m.root == "/"
            continue
        for c in m.controllers:
            path = paths.get(c)
            rel = _below(path, m.root) if path is not None else None
            if rel is not None:
                v1[c] = posixpath.join(m.mount_point, rel) if rel else m.mount_point
    return LauncherGroups(v1=v1, v2=v2, v2_is_root=v2_root)


# What making a run's group does, as data (firma.backends.bwrap.cgroup runs it in order).
MKDIR = "mkdir"  # a directory of the run's group: removed at teardown
MKDIR_LEAF = "mkdir-leaf"  # v2: the launcher's leaf; stays until the launcher exits (swept later)
WRITE = "write"  # a pid into cgroup.procs, or controllers into cgroup.subtree_control
LIMIT = "limit"  # a limit: written, then read back
AWAIT = "await"  # wait for the sandbox's pids (the steps before it run while bwrap starts)
JOIN = "join"  # each of the sandbox's pids into cgroup.procs
LAUNCHER_LEAF_SUFFIX = ".launcher"  # v2: `<run group name>.launcher`, the launcher's leaf


@record
class CgroupStep:
    action: str
    path: str = ""
    value: str = ""
    optional: bool = False  # skipped where the file does not exist (swap accounting off)


def cgroup_steps(plan: LimitPlan, name: str, launcher_pid: int) -> tuple[CgroupStep, ...]:
    """The steps that make the run's group `name` under the launcher's own group and move the
    held sandbox's processes (bwrap and its init) into it.

    The first move of a process between cgroups waits for an RCU grace period (~10 ms here); the
    steps before AWAIT run while bwrap starts, and one of them moves the launcher (v2: into its
    leaf; v1: into the group it is already in, a no-op that pays the wait), so the sandbox's own
    moves after AWAIT are quick.

    v2: a group holding a process cannot hand controllers to its children, so the launcher moves
    itself into a leaf of its own group first, then the sandbox moves into the run's group, then
    the controllers are enabled, then the limits are written (their files exist only then)."""
    dirs = {c: posixpath.join(p, name) for c, p in plan.cgroup_parents.items()}
    unique = list(dict.fromkeys(dirs.values()))
    steps = [CgroupStep(MKDIR, d) for d in unique]
    parent = next(iter(plan.cgroup_parents.values()), "")
    limits = [CgroupStep(LIMIT, posixpath.join(dirs[w.controller], w.file), w.value, w.optional) for w in plan.writes]
    joins = [CgroupStep(JOIN, posixpath.join(d, "cgroup.procs")) for d in unique]
    if plan.cgroup_version == V2:
        if plan.move_self:
            leaf = posixpath.join(parent, name + LAUNCHER_LEAF_SUFFIX)
            steps += [CgroupStep(MKDIR_LEAF, leaf), CgroupStep(WRITE, posixpath.join(leaf, "cgroup.procs"), str(launcher_pid))]
        steps += [CgroupStep(AWAIT), *joins,
                  CgroupStep(WRITE, posixpath.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in plan.cgroup_parents)),
                  *limits]
    else:
        first = next(iter(dict.fromkeys(plan.cgroup_parents.values())), "")
        steps += [*limits, CgroupStep(WRITE, posixpath.join(first, "cgroup.procs"), str(launcher_pid)), CgroupStep(AWAIT), *joins]
    return tuple(steps)


"""The run's cgroup (DESIGN §5.3): made under the launcher's own group before the release, the
held sandbox's processes moved into it (everything the agent starts is born inside), its
counters read once the agent has exited, removed at teardown. The services process, forked
after the release from the launcher, stays outside it.

Order, for both versions: make the directories; (v2, when the launcher's group holds only the
launcher) move the launcher into a leaf of its group; move bwrap and the sandbox's init into the
run's group; (v2) hand the controllers to the children of the launcher's group; write the
limits and read each back. Nothing of the sandbox runs yet, so no process escapes the move."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable
from ...core import cgroupfs
from ...core.limits import V2, LimitPlan
from ...errors import LaunchError

# A run's group (or v2 launcher leaf) that is empty and older than this is a dead launcher's.
STALE_SECS = 60.0
REMOVE_TIMEOUT = 2.0
PREFIX = "firma-"
# Files whose value the kernel rounds down to a page multiple when written.
_PAGE_ROUNDED = frozenset({"memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max"})


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


def _procs(d: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def sweep_stale(parent: str, now: float) -> list[str]:
    """Remove the empty `firma-*` groups of launchers that died (older than STALE_SECS); a live
    run's group holds its sandbox, and rmdir refuses a group that holds a process."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for n in names:
        d = os.path.join(parent, n)
        try:
            if now - os.stat(d).st_mtime < STALE_SECS or _procs(d):
                continue
            os.rmdir(d)
            removed.append(d)
        except OSError:
            continue
    return removed


class RunCgroup:
    """The run's group: one directory per v1 hierarchy used, or one on the unified hierarchy."""

    def __init__(self, plan: LimitPlan, name: str) -> None:
        self.plan = plan
        self.version = plan.cgroup_version
        self.dirs: dict[str, str] = {c: os.path.join(p, name) for c, p in plan.cgroup_parents.items()}
        self._made: list[str] = []
        self._name = name

    @property
    def unique_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def create(self, pids: Callable[[], tuple[int, ...] | None]) -> None:
        """Run `cgroupfs.cgroup_steps`: make the group, write and read back the limits, move the
        sandbox's processes in once `pids()` gives them (None: the launch was abandoned; stop).
        Raises LaunchError; what was made is removed by `remove`."""
        now = time.time()
        for parent in dict.fromkeys(self.plan.cgroup_parents.values()):
            sweep_stale(parent, now)
        members: tuple[int, ...] = ()
        for step in cgroupfs.cgroup_steps(self.plan, self._name, os.getpid()):
            if step.action == cgroupfs.AWAIT:
                got = pids()
                if got is None:
                    return
                members = got
                continue
            try:
                if step.action == cgroupfs.MKDIR:
                    os.mkdir(step.path, 0o755)
                    self._made.append(step.path)
                elif step.action == cgroupfs.MKDIR_LEAF:
                    os.mkdir(step.path, 0o755)
                elif step.action == cgroupfs.JOIN:
                    for pid in members:
                        _write(step.path, str(pid))
                elif step.optional and not os.path.exists(step.path):
                    continue
                else:
                    _write(step.path, step.value)
                if step.action == cgroupfs.LIMIT:
                    got_value = _read(step.path).strip()
                    if not _same(os.path.basename(step.path), step.value, got_value):
                        raise LaunchError(f"the run's cgroup {step.path} reads {got_value!r}, not {step.value}; "
                                          "refusing to start the agent")
            except OSError as exc:
                what = f"{step.action} {step.path}" + (f" = {step.value}" if step.value else "")
                raise LaunchError(
                    f"cannot make the run's cgroup ({what}): {exc.strerror}; refusing to start the agent "
                    "(`firma doctor` shows what this host allows)"
                ) from None

    def holds(self, pid: int) -> bool:
        """`pid` is in the run's group in every hierarchy used (read from /proc/<pid>/cgroup)."""
        try:
            lines = _read(f"/proc/{pid}/cgroup").splitlines()
        except OSError:
            return False
        name = "/" + self._name
        seen = set()
        for line in lines:
            _, ctrls, path = line.split(":", 2)
            if not path.endswith(name):
                continue
            if self.version == V2 and ctrls == "":
                return True
            seen.update(ctrls.split(","))
        return self.version != V2 and set(self.dirs) <= seen

    def counters(self) -> dict[str, int]:
        """oom_kill (memory) and pids_max (forks refused) of the run, 0 when unreadable."""
        out = {"oom_kill": 0, "pids_max": 0}
        mem = self.dirs.get("memory")
        if mem is not None:
            out["oom_kill"] = _field(os.path.join(mem, "memory.events" if self.version == V2 else "memory.oom_control"), "oom_kill")
        pids = self.dirs.get("pids")
        if pids is not None:
            out["pids_max"] = _field(os.path.join(pids, "pids.events"), "max")
        return out

    def remove(self) -> str | None:
        """Kill what is left in the group and remove it (and the v2 launcher leaf once the
        launcher has left it: it stays until this launcher exits, then a later run sweeps it).
        The reason when a directory could not be removed in time."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        left = list(reversed(self._made))
        while left:
            d = left[-1]
            for pid in _procs(d):
                _kill_member(pid, d)
            try:
                os.rmdir(d)
                left.pop()
                continue
            except FileNotFoundError:
                left.pop()
                continue
            except OSError as exc:
                if time.monotonic() > deadline:
                    return f"cannot remove the run's cgroup {d}: {exc.strerror}"
            time.sleep(0.005)
        self._made = []
        return None


def _kill_member(pid: int, d: str) -> None:
    """SIGKILL `pid` through a pidfd, once it is known to still be in the group `d` (a pid read
    from cgroup.procs could be reused by then)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if pid in _procs(d):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _field(path: str, key: str) -> int:
    try:
        for line in _read(path).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


def _same(file: str, wanted: str, got: str) -> bool:
    if got == wanted:
        return True
    if file in _PAGE_ROUNDED:
        try:
            return 0 <= int(wanted) - int(got) < 1 << 16
        except ValueError:
            return False
    return False

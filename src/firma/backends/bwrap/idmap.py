"""A root caller's agent runs as an unprivileged host uid (DESIGN §5.1).

With firma running as root, bwrap's user namespace would belong to host root, and the agent's
file accesses and /proc/sys writes would be host root's. Instead the launcher's child, before it
executes bwrap:
  1. enters a private mount namespace of its own (nothing shows on the host, and it goes away
     with the sandbox, SIGKILL included);
  2. mounts a fresh tmpfs at the stage and attaches there the clones the launcher prepared:
     the workspace and each mount source cloned with `open_tree` and idmapped with
     `mount_setattr(MOUNT_ATTR_IDMAP)` so that their owner's files are the agent uid's (files the
     agent creates are the owner's on disk), and plain clones of the generated /etc files;
  3. drops to the agent's host uid and gid, with no supplementary groups, and executes bwrap,
     which binds the staged paths as usual.

Python 3.11 has no wrappers for the new mount API: the three syscalls go through ctypes. Every
failure is one line that says why and how to run instead."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from ...core import bwrap_plan
from ...errors import LaunchError

# x86_64 and aarch64 share these numbers (the new mount API is in the generic syscall table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18

_RUN_AS_USER = "run firma as a normal (non-root) user instead"


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


class _Sys:
    """The few raw calls, raising OSError with errno."""

    def __init__(self) -> None:
        self.libc = _libc()
        self._prctl = self.libc.prctl  # looked up before the fork, not in the child

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return rc

    def open_tree(self, path: str) -> int:
        flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE | _AT_SYMLINK_NOFOLLOW
        return self._check(self.libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path), flags), "open_tree")

    def idmap(self, tree_fd: int, userns_fd: int) -> None:
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns_fd))
        self._check(
            self.libc.syscall(_SYS_MOUNT_SETATTR, tree_fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, attr, 32),
            "mount_setattr",
        )

    def move_mount(self, tree_fd: int, target: str) -> None:
        self._check(
            self.libc.syscall(_SYS_MOVE_MOUNT, tree_fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
            "move_mount",
        )

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(flags), "unshare")

    def die_with_parent(self, parent: int) -> None:
        """SIGKILL when `parent` dies; exits now if it already has (the setting is cleared by a
        credential change, so it is made after the drop, and bwrap's own comes only later)."""
        self._check(self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        if os.getppid() != parent:
            os._exit(1)

    def mount(self, source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
        self._check(self.libc.mount(source, os.fsencode(target), fstype, flags, data), "mount")


def _userns_fd(sys_: _Sys, owner: tuple[int, int], agent: tuple[int, int]) -> int:
    """A user namespace mapping `owner` to `agent` (uid and gid), held by a descriptor: the
    idmapping of a mount. A short-lived child creates it; we write its maps and keep the ns."""
    r, w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: never returns into the launcher's code
        try:
            os.close(w)
            os.close(ready_r)
            sys_.unshare(_CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(r, 1)
            os._exit(0)
        finally:
            os._exit(1)
    os.close(r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "cannot create a user namespace for the idmapping")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"{owner[0]} {agent[0]} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"{owner[1]} {agent[1]} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(w)
        os.waitpid(pid, 0)


class StagedClones:
    """The detached clones for one launch and the child-side step that attaches them and drops to
    the agent's uid (`enter`, run between fork and exec). `close` releases the clones; a clone
    never attached vanishes with its descriptor."""

    def __init__(self, plan: bwrap_plan.BwrapPlan) -> None:
        self._sys = _Sys()
        self._launcher = os.getpid()
        self._agent = (plan.agent_host_uid, plan.agent_host_gid)
        self._trees: list[tuple[int, bwrap_plan.StagedSource]] = []
        self._report_r, self._report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        userns: dict[tuple[int, int], int] = {}
        try:
            for st in plan.staged:
                fd = self._clone(st.source)
                self._trees.append((fd, st))
                if st.owner is None:
                    continue
                if st.owner not in userns:
                    userns[st.owner] = _userns_fd(self._sys, st.owner, self._agent)
                self._idmap(fd, userns[st.owner], st.source)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in userns.values():
                os.close(fd)

    def _clone(self, source: str) -> int:
        try:
            return self._sys.open_tree(source)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise LaunchError(
                    "firma runs as root but without CAP_SYS_ADMIN in the host's user namespace (a "
                    "container?), so it cannot give the agent an unprivileged uid; " + _RUN_AS_USER
                ) from None
            raise LaunchError(f"cannot clone {source} for the sandbox: {exc.strerror}; {_RUN_AS_USER}") from None

    def _idmap(self, fd: int, userns_fd: int, source: str) -> None:
        try:
            self._sys.idmap(fd, userns_fd)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise LaunchError(
                    f"the filesystem of {source} does not support idmapped mounts (NFS and most FUSE "
                    "do not), so firma running as root cannot give the agent an unprivileged uid; "
                    + _RUN_AS_USER
                ) from None
            raise LaunchError(f"cannot idmap {source} for the sandbox: {exc.strerror}; {_RUN_AS_USER}") from None

    def enter(self) -> None:
        """In the child, before exec: private mount namespace, stage, attach, drop privileges.
        A failure is written to the report pipe (subprocess only says that the step failed)."""
        try:
            self._enter()
        except OSError as exc:
            os.write(self._report_w, f"{exc.strerror or exc}".encode()[:512])
            raise

    def failure(self) -> str:
        """What `enter` reported in the child, after a failed start ('' if nothing)."""
        os.close(self._report_w)
        self._report_w = -1
        return os.read(self._report_r, 512).decode(errors="replace")

    def _enter(self) -> None:
        self._sys.unshare(_CLONE_NEWNS)
        self._sys.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
        self._sys.mount(b"tmpfs", bwrap_plan.STAGE_ROOT, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755")
        os.mkdir(bwrap_plan.STAGE_DIR, 0o755)
        for fd, st in self._trees:
            if st.kind == bwrap_plan.DIR:
                os.mkdir(st.staged, 0o755)
            else:
                os.close(os.open(st.staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            self._sys.move_mount(fd, st.staged)
        os.setgroups([])
        os.setresgid(*(self._agent[1],) * 3)
        os.setresuid(*(self._agent[0],) * 3)
        # Launcher killed while this child stages: no bwrap may start without it (guard.py).
        self._sys.die_with_parent(self._launcher)

    def close(self) -> None:
        for fd, _ in self._trees:
            os.close(fd)
        self._trees = []
        for fd in (self._report_r, self._report_w):
            if fd >= 0:
                os.close(fd)
        self._report_r = self._report_w = -1

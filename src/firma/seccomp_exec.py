"""Exec gate: deny execve to everything but the initial command (`system.execute`).

bwrap loads `--seccomp` right before its own final execve, so an execve deny in that filter would
also stop the agent from starting. Instead bwrap starts this script (run as a file with
`python -I`, so nothing from the agent's environment or working directory is imported), which:

1. copies the command's path, argv array and envp array to three independent random addresses;
2. loads a second filter: execve is EPERM unless (path, argv, envp) are *exactly* those three
   pointer values, execveat is always EPERM, foreign architectures are killed;
3. calls execve with exactly those pointers. The new image replaces this address space.

Why this is sound: seccomp filters stack and cannot be removed; the three 64-bit values exist only
in this (gone) address space and inside the kernel's filter, which an unprivileged process cannot
read (PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN, and ptrace is denied anyway). An agent that
wants to exec again must guess all three at once (> 100 bits on every 64-bit arch; every wrong
guess is just EPERM). No helper process stays behind in the sandbox. A USER_NOTIF supervisor would
be deterministic too, but needs a live process the agent could stop or kill.

Exit status when the command cannot be started: 127 not found, 126 otherwise (shell convention)."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import signal
import stat
import sys

import pyseccomp

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_FIXED_NOREPLACE = 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return libc


def _place(libc: ctypes.CDLL, data: bytes, align: int) -> int:
    """Copy `data` to a fresh private mapping at a random address and random aligned offset."""
    page = os.sysconf("SC_PAGE_SIZE")
    size = (len(data) + 2 * page - 1) // page * page
    for top in (1 << 46, 1 << 38):  # 47-bit VA on x86_64; 39-bit is the smallest arm64 layout
        hint = (1 << 32) + secrets.randbelow((top - (1 << 32) - size) // page) * page
        addr = libc.mmap(hint, size, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE,
                         -1, 0)
        if addr not in (None, _MAP_FAILED):
            break
    else:
        raise OSError(ctypes.get_errno(), "mmap failed")
    offset = secrets.randbelow(page // align) * align
    ctypes.memmove(addr + offset, data, len(data))
    return addr + offset


def _resolve(cmd: str, env: dict[str, str]) -> str | None:
    """execvp's search: a name with a slash is used as is, else the first executable on PATH."""
    if "/" in cmd:
        return cmd
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", cmd)
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(cand, os.X_OK):
            return cand
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("firma exec gate: usage: seccomp_exec.py -- CMD [ARGS...]", file=sys.stderr)
        return 126
    cmd = argv[1:]
    env = dict(os.environ)
    path = _resolve(cmd[0], env)
    if path is None:
        print(f"firma exec gate: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    libc = _libc()
    keep = [ctypes.create_string_buffer(os.fsencode(a)) for a in cmd]
    keep_env = [ctypes.create_string_buffer(os.fsencode(f"{k}={v}")) for k, v in env.items()]

    def ptr_array(bufs: list[ctypes.Array]) -> bytes:
        arr = (ctypes.c_void_p * (len(bufs) + 1))(*[ctypes.addressof(b) for b in bufs], None)
        return bytes(arr)

    word = ctypes.sizeof(ctypes.c_void_p)
    p_path = _place(libc, os.fsencode(path) + b"\0", 1)
    p_argv = _place(libc, ptr_array(keep), word)
    p_envp = _place(libc, ptr_array(keep_env), word)

    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    deny = pyseccomp.ERRNO(errno.EPERM)
    # Three rules = OR: any one pointer differing from ours denies the call.
    for index, value in ((0, p_path), (1, p_argv), (2, p_envp)):
        filt.add_rule(deny, "execve", pyseccomp.Arg(index, pyseccomp.NE, value))
    filt.add_rule(deny, "execveat")
    filt.load()

    # Python ignores these; ignored dispositions survive execve and would change the agent.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    nr = pyseccomp.resolve_syscall(pyseccomp.system_arch(), "execve")
    libc.syscall(nr, p_path, p_argv, p_envp)
    err = ctypes.get_errno()
    print(f"firma exec gate: cannot execute {path}: {os.strerror(err)}", file=sys.stderr)
    return 127 if err == errno.ENOENT else 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

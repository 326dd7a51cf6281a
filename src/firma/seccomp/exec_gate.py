"""Exec gate: deny execve to everything but the initial command (`system.execute`).

bwrap loads `--seccomp` right before its own final execve, so an execve deny in that filter would
also stop the agent from starting. Instead bwrap starts this program (standard library only, run
by a system python3 as `python3 -I -S -c <this source>`, so it works when the firma install is not
visible inside the sandbox and imports nothing from the agent's environment or directory), which:

1. copies the command's path, argv array and envp array to three independent random addresses;
2. loads a second filter: execve is EPERM unless (path, argv, envp) are *exactly* those three
   pointer values, execveat is always EPERM, any other architecture/ABI kills the process;
3. calls execve with exactly those pointers. The new image replaces this address space.
   A `#!/usr/bin/env NAME` script is started as NAME directly (what env would do), since env's
   own execve would be the second one.

Why this is sound: seccomp filters stack and cannot be removed; the three 64-bit values exist only
in this (gone) address space and in the kernel's copy of the filter, which an unprivileged process
cannot read (PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN, and ptrace is denied anyway). Execing
again means guessing all three at once (> 100 bits on every supported arch; a wrong guess is just
EPERM). No helper stays behind in the sandbox. A USER_NOTIF supervisor would also be exact, but
needs a live process the agent could stop or kill.

Usage: gate ARCH NR_EXECVE NR_EXECVEAT -- CMD [ARGS...]  (numbers from libseccomp, outside).
Exit status when the command cannot be started: 127 not found, 126 otherwise (shell convention)."""

import ctypes
import errno
import os
import secrets
import signal
import stat
import struct
import sys

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_FIXED_NOREPLACE = 0x100000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06


def gate_program(arch: int, nr_execve: int, nr_execveat: int, ptrs: tuple) -> bytes:
    """The gate filter as sock_filter bytes (little-endian arches; seccomp_data layout:
    nr @0, arch @4, ip @8, args[i] @16+8i)."""
    insns = []  # (code, jt, jf, k); jumps are resolved below

    def op(code, k=0, jt=0, jf=0):
        insns.append([code, jt, jf, k])

    op(_LD_W_ABS, 4)
    op(_JEQ_K, arch, 0, "kill")
    op(_LD_W_ABS, 0)
    if arch == _AUDIT_ARCH_X86_64:
        op(_JGE_K, _X32_SYSCALL_BIT, "kill", 0)
    op(_JEQ_K, nr_execveat, "deny", 0)
    op(_JEQ_K, nr_execve, 0, "allow")
    for i, value in enumerate(ptrs):
        op(_LD_W_ABS, 16 + 8 * i)
        op(_JEQ_K, value & 0xFFFFFFFF, 0, "deny")
        op(_LD_W_ABS, 16 + 8 * i + 4)
        op(_JEQ_K, value >> 32, 0, "deny")
    labels = {"allow": len(insns), "deny": len(insns) + 1, "kill": len(insns) + 2}
    op(_RET_K, _RET_ALLOW)
    op(_RET_K, _RET_ERRNO | errno.EPERM)
    op(_RET_K, _RET_KILL_PROCESS)
    out = b""
    for pc, (code, jt, jf, k) in enumerate(insns):
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        out += struct.pack("<HBBI", code, jt, jf, k)
    return out


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    libc.prctl.restype = ctypes.c_int
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def _place(libc, data: bytes, align: int) -> int:
    """Copy `data` to a fresh private mapping at a random address and random aligned offset."""
    page = os.sysconf("SC_PAGE_SIZE")
    size = (len(data) + 2 * page - 1) // page * page
    failed = ctypes.c_void_p(-1).value
    for top in (1 << 46, 1 << 38):  # 47-bit VA on x86_64; 39-bit is the smallest arm64 layout
        hint = (1 << 32) + secrets.randbelow((top - (1 << 32) - size) // page) * page
        addr = libc.mmap(hint, size, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE,
                         -1, 0)
        if addr not in (None, failed):
            break
    else:
        raise OSError(ctypes.get_errno(), "mmap failed")
    offset = secrets.randbelow(page // align) * align
    ctypes.memmove(addr + offset, data, len(data))
    return addr + offset


def _resolve(cmd: str, env: dict):
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


def _through_env(path: str, cmd: list, env: dict):
    """`#!/usr/bin/env NAME` scripts (most agent CLIs) would need a second execve from env(1);
    do env's lookup here so the one permitted execve goes straight to NAME."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256).split(b"\n", 1)[0]
    except OSError:
        return path, cmd
    if not head.startswith(b"#!"):
        return path, cmd
    words = head[2:].split()
    if len(words) != 2 or os.path.basename(words[0]) != b"env":
        return path, cmd
    name = os.fsdecode(words[1])
    if name.startswith("-") or "=" in name:
        return path, cmd
    interp = _resolve(name, env)
    if interp is None:
        return path, cmd  # let the kernel report it
    return interp, [name, path, *cmd[1:]]


def main(argv: list) -> int:
    if len(argv) < 5 or argv[3] != "--":
        print("firma exec gate: usage: ARCH NR_EXECVE NR_EXECVEAT -- CMD [ARGS...]",
              file=sys.stderr)
        return 126
    arch, nr_execve, nr_execveat = (int(a, 0) for a in argv[:3])
    cmd = argv[4:]
    env = dict(os.environ)
    path = _resolve(cmd[0], env)
    if path is None:
        print(f"firma exec gate: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    path, cmd = _through_env(path, cmd, env)
    libc = _libc()
    keep = [ctypes.create_string_buffer(os.fsencode(a)) for a in cmd]
    keep_env = [ctypes.create_string_buffer(os.fsencode(f"{k}={v}")) for k, v in env.items()]

    def ptr_array(bufs) -> bytes:
        arr = (ctypes.c_void_p * (len(bufs) + 1))(*[ctypes.addressof(b) for b in bufs], None)
        return bytes(arr)

    word = ctypes.sizeof(ctypes.c_void_p)
    ptrs = (_place(libc, os.fsencode(path) + b"\0", 1), _place(libc, ptr_array(keep), word),
            _place(libc, ptr_array(keep_env), word))
    prog = gate_program(arch, nr_execve, nr_execveat, ptrs)
    filt = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(filt))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or libc.prctl(
        _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0
    ) != 0:
        err = ctypes.get_errno()
        print(f"firma exec gate: cannot load the execve filter: {os.strerror(err)}",
              file=sys.stderr)
        return 126  # never run the command unfiltered

    # Python ignores these; ignored dispositions survive execve and would change the agent.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    libc.syscall(nr_execve, *ptrs)
    err = ctypes.get_errno()
    print(f"firma exec gate: cannot execute {path}: {os.strerror(err)}", file=sys.stderr)
    return 127 if err == errno.ENOENT else 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

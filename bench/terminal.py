"""Terminal relay benchmark (DESIGN §12a): keystroke-to-echo latency (median of N single bytes
echoed by a raw `cat`) and bulk output throughput (`cat` of a file to the terminal), on a plain
pty next to the same program inside `firma run` on a pty (firma relays its own pty). One run,
side by side; firma's start-up is excluded (both sides wait for a ready marker first)."""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import statistics
import sys
import tempfile
import termios
import time


def spawn(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[int, int]:
    master, slave = os.openpty()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(master)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(slave)
    return pid, master


def read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf:
        if time.monotonic() > end:
            raise SystemExit(f"no {marker!r} within {timeout}s; got {buf[-300:]!r}")
        if select.select([fd], [], [], 0.5)[0]:
            buf += os.read(fd, 1 << 20)
    return buf


def keystrokes(prefix: list[str], cwd: str, env: dict[str, str], n: int) -> float:
    pid, m = spawn([*prefix, "/bin/sh", "-c", "stty raw -echo; echo READY; exec cat"], cwd, env)
    try:
        read_until(m, b"READY")
        time.sleep(0.2)
        samples = []
        for i in range(n):
            ch = bytes([97 + i % 26])
            t = time.perf_counter()
            os.write(m, ch)
            got = b""
            while ch not in got:
                select.select([m], [], [], 5)
                got += os.read(m, 64)
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1e6
    finally:
        os.write(m, b"\x04")
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(m)


def bulk(prefix: list[str], cwd: str, env: dict[str, str], path: str, size: int) -> float:
    pid, m = spawn([*prefix, "/bin/sh", "-c", f"stty raw -echo; echo READY; sleep 0.3; cat {path}; echo; echo DONE-MARK"],
                   cwd, env)
    try:
        read_until(m, b"READY")
        got = 0
        tail = b""
        t = None
        while b"DONE-MARK" not in tail:
            if not select.select([m], [], [], 30)[0]:
                raise SystemExit("bulk output stalled")
            chunk = os.read(m, 1 << 20)
            if t is None:
                t = time.perf_counter()
            got += len(chunk)
            tail = (tail + chunk)[-64:]
        assert t is not None
        return size / (time.perf_counter() - t) / (1 << 20)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(m)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=300, help="keystrokes")
    ap.add_argument("--mib", type=int, default=100, help="bulk output size")
    args = ap.parse_args()
    ws = tempfile.mkdtemp(prefix="firma-bench-tty-")
    state = tempfile.mkdtemp(prefix="firma-bench-tty-state-")
    data = os.path.join(ws, "bulk.txt")
    with open(data, "wb") as f:
        line = b"x" * 79 + b"\n"
        f.write(line * ((args.mib << 20) // len(line)))
    size = os.path.getsize(data)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "TERM": "xterm", "LANG": "C.UTF-8",
           "FIRMA_STATE_DIR": state}
    firma = [sys.executable, "-m", "firma", "run", "--quiet", "--"]
    rows = []
    for name, prefix in (("plain pty", []), ("firma run (relayed pty)", firma)):
        rows.append((name, keystrokes(prefix, ws, env, args.n), bulk(prefix, ws, env, data, size)))
    print(f"terminal benchmark: {args.n} keystrokes (median), {args.mib} MiB of output, uid={os.getuid()}, {os.cpu_count()} CPUs")
    print(f"{'path':<28} {'keystroke echo µs':>18} {'output MiB/s':>13}")
    for name, key_us, mib_s in rows:
        print(f"{name:<28} {key_us:18.0f} {mib_s:13.0f}")
    print(f"relay adds {rows[1][1] - rows[0][1]:.0f} µs per keystroke; output {rows[1][2] / rows[0][2]:.2f} × the plain pty's")
    return 0


if __name__ == "__main__":
    sys.exit(main())

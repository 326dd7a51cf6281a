#!/usr/bin/python3
"""A bwrap stand-in for tests/linux/test_lo_race.py (named by `[host].bwrap`): it reports the
sandbox before the sandbox's network is set up. It runs the real bwrap with --userns-block-fd,
forwards bwrap's info at once, writes the child's id maps itself (bwrap leaves them to the
caller then) and releases the child DELAY seconds later. Test-only: it drops --disable-userns,
which bwrap refuses next to --userns-block-fd."""
import json
import os
import signal
import sys
import time

REAL, DELAY = "/usr/bin/bwrap", 0.6
argv = sys.argv[1:]
if argv[:1] == ["--version"]:
    os.execv(REAL, [REAL, "--version"])
i = argv.index("--args")
fd = int(argv[i + 1])
os.lseek(fd, 0, 0)
data = b""
while chunk := os.read(fd, 65536):
    data += chunk
args = data.split(b"\0")[:-1]
k = args.index(b"--info-fd")
info_fd = int(args[k + 1])
r_info, w_info = os.pipe()
r_blk, w_blk = os.pipe()
args[k + 1] = str(w_info).encode()
inside_uid = int(args[args.index(b"--uid") + 1]) if b"--uid" in args else os.getuid()
inside_gid = int(args[args.index(b"--gid") + 1]) if b"--gid" in args else os.getgid()
args = [b"--userns-block-fd", str(r_blk).encode()] + [a for a in args if a != b"--disable-userns"]
new = os.memfd_create("bwrap-args", 0)
os.write(new, b"\0".join(args) + b"\0")
os.lseek(new, 0, 0)
pid = os.fork()
if pid == 0:
    for f in (new, w_info, r_blk):
        os.set_inheritable(f, True)
    os.close(r_info)
    os.close(w_blk)
    os.execv(REAL, [REAL, "--args", str(new), *argv[i + 2:]])
for f in (w_info, r_blk, new):
    os.close(f)
buf = b""
while not buf.rstrip().endswith(b"}"):
    chunk = os.read(r_info, 4096)
    if not chunk:
        break
    buf += chunk
child = json.loads(buf)["child-pid"]
t_info = time.monotonic()
os.write(info_fd, buf)
os.close(info_fd)
for name, text in (("setgroups", "deny"), ("uid_map", f"{inside_uid} {os.getuid()} 1"), ("gid_map", f"{inside_gid} {os.getgid()} 1")):
    with open(f"/proc/{child}/{name}", "w") as f:
        f.write(text)
time.sleep(DELAY)
os.write(w_blk, b"x")
with open(os.environ.get("LATE_LO_EVIDENCE", "/dev/null"), "a") as f:
    f.write(f"released {time.monotonic() - t_info:.2f}s after the info\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda n, _f: os.kill(pid, n))
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))

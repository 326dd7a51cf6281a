"""The agent's own terminal (DESIGN §12a), driven through a real pseudo-terminal: firma runs as the
session leader of a test pty (as in a terminal emulator); inside, bash has job control, /dev/tty,
silent reads, ^C and ^Z reach only the agent's foreground job, the window size follows; the outer
terminal's settings are the same afterwards, also when the agent changed its own (`stty susp a
-isig -echo`) and when firma is stopped by SIGTERM mid-run. Without a terminal nothing changes
(pipes: tests/linux/test_linux_lifecycle.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import termios
import time

from linux_support import base_env, firma_cmd, require_tools


class Term:
    """firma in a fresh pty, as a terminal emulator would start it."""

    def __init__(self, argv: list[str], cwd, env) -> None:
        self.master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        # the outer terminal's settings before firma exists (read later, firma may have made it raw)
        self.initial = termios.tcgetattr(slave)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child becomes firma
            try:
                os.close(self.master)
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        os.close(slave)
        # a descriptor of the outer terminal to read its settings (never its controlling one)
        self.outer = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY)
        self.out = b""

    def read(self, secs: float = 1.0, until: bytes | None = None) -> bytes:
        end = time.monotonic() + secs
        start = len(self.out)
        while time.monotonic() < end:
            if until is not None and until in self.out[start:]:
                break
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    break
        return self.out[start:]

    def send(self, data: bytes, wait_for: bytes | None = None, secs: float = 5.0) -> bytes:
        os.write(self.master, data)
        return self.read(secs, wait_for)

    def attrs(self):
        return termios.tcgetattr(self.outer)

    def wait(self, secs: float = 30) -> int:
        end = time.monotonic() + secs
        while time.monotonic() < end:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"firma did not exit: {self.out[-500:]!r}")

    def close(self) -> None:
        for fd in (self.master, self.outer):
            try:
                os.close(fd)
            except OSError:
                pass


def _bash(ws, tmp_path, *extra: str) -> Term:
    env = base_env(tmp_path, TERM="xterm")
    return Term(firma_cmd("run", "--quiet", *extra, "--", "bash", "--norc", "--noprofile", "-i"), ws, env)


def test_job_control_dev_tty_silent_reads_and_signals_reach_the_agent_only(ws, tmp_path):
    require_tools()
    t = _bash(ws, tmp_path)
    try:
        before = t.initial
        assert b"$ " in t.read(10, b"$ "), t.out
        assert b"no job control" not in t.out and b"cannot set terminal process group" not in t.out
        out = t.send(b"sleep 100 &\n", b"$ ")
        assert b"[1]" in out
        # markers are computed by the shell: the echoed command line never contains them
        out = t.send(b"exec 3</dev/tty && echo DEVTTY-$((40+2))\n", b"DEVTTY-42")
        assert b"DEVTTY-42" in out, out
        t.send(b"sleep 50\n", b"sleep 50")
        time.sleep(0.3)
        out = t.send(b"\x1a", b"Stopped")  # ^Z: the agent's foreground job stops, not firma
        assert b"Stopped" in out, out
        out = t.send(b"bg; jobs\n", b"sleep 50 &")
        assert b"sleep 50 &" in out, out
        out = t.send(b"read -s -p \"$(printf p%s w):\" x; echo; echo got=$x\n", b"pw:")
        out = t.send(b"hunter2\n", b"got=")
        t.read(1, b"$ ")
        assert b"got=hunter2" in t.out and b"hunter2\r\n" not in out.split(b"got=")[0], out  # typed silently
        t.send(b"sleep 30\n", b"sleep 30")
        time.sleep(0.3)
        out = t.send(b"\x03", b"$ ")  # ^C: only the foreground sleep
        out = t.send(b"echo ali$((0))ve\n", b"ali0ve")
        assert b"ali0ve" in out
        # the attacker's trick: make `a` the suspend key and turn echo off
        t.send(b"stty susp a; echo chan$((1))ged\n", b"chan1ged")
        t.send(b"a")  # reaches the agent's pty (its shell ignores the stop), never firma
        time.sleep(0.3)
        with open(f"/proc/{t.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # firma is not stopped
        t.send(b"\x15stty -isig -echo; echo chan$((2))ged\n", b"chan2ged")
        t.send(b"kill %1 %2; exit 7\n")
        assert t.wait() == 7
        assert t.attrs() == before  # the outer terminal is as it was
        # nothing of the run holds the user's terminal afterwards (the agent never had it)
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == t.slave_name and int(pid) != os.getpid():
                        holders.append(pid)
                except OSError:
                    pass
        assert holders == [], holders
    finally:
        t.close()


def test_the_window_size_follows_the_terminal(ws, tmp_path):
    require_tools()
    t = _bash(ws, tmp_path)
    try:
        fcntl.ioctl(t.master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        t.read(10, b"$ ")
        out = t.send(b"stty size\n", b"24 80")
        assert b"24 80" in out, out
        fcntl.ioctl(t.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))  # the kernel sends SIGWINCH
        time.sleep(0.3)
        out = t.send(b"stty size\n", b"40 123")
        assert b"40 123" in out, out
        t.send(b"exit\n")
        assert t.wait() == 0
    finally:
        t.close()


def test_sigterm_mid_run_restores_the_outer_terminal(ws, tmp_path):
    require_tools()
    t = _bash(ws, tmp_path)
    try:
        before = t.initial
        t.read(10, b"$ ")
        t.send(b"sleep 100\n", b"sleep 100")
        time.sleep(0.3)
        raw = t.attrs()
        assert raw != before  # raw while the agent runs (control: the restore below is real)
        # an interactive bash ignores the forwarded SIGTERM; the second one kills the sandbox
        os.kill(t.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(t.pid, signal.SIGTERM)
        t.wait()
        assert t.attrs() == before
    finally:
        t.close()


def test_tiocsti_inside_never_reaches_the_outer_terminal(ws, tmp_path):
    """An injection ioctl inside is refused (seccomp), and the agent's pty is its own anyway.
    Control: the same call outside the sandbox, on a terminal of the test's, injects."""
    require_tools()
    import tty

    m, s = os.openpty()
    try:
        tty.setraw(s)
        fcntl.ioctl(s, termios.TIOCSTI, b"X")
        assert select.select([s], [], [], 5)[0] and os.read(s, 10) == b"X"  # control: it works outside (as root)
    except OSError as exc:
        assert exc.errno == errno.EPERM, exc  # a kernel with legacy TIOCSTI off refuses even that
    finally:
        os.close(m)
        os.close(s)
    env = base_env(tmp_path, TERM="xterm")
    probe = ("import fcntl, termios\n"
             "try:\n"
             "    fcntl.ioctl(0, termios.TIOCSTI, b'Z'); print('INJECTED')\n"
             "except OSError as e:\n"
             "    print('refused', e.errno)\n")
    t = Term(firma_cmd("run", "--quiet", "--", "/usr/bin/python3", "-c", probe), ws, env)
    try:
        assert t.wait() == 0
        assert b"refused 1" in t.out, t.out  # EPERM from the seccomp filter
        assert b"INJECTED" not in t.out
    finally:
        t.close()


def test_no_tty_keeps_pipes(ws, tmp_path):
    require_tools()
    env = base_env(tmp_path, TERM="xterm")
    t = Term(firma_cmd("run", "--quiet", "--no-tty", "--", "sh", "-c", "tty; test -t 0 && echo stdin-tty"), ws, env)
    try:
        assert t.wait() == 0
        # --no-tty: the agent gets firma's own stdio (this test's pty), no pty of its own and
        # no controlling terminal inside its new session
        assert b"not a tty" in t.out or b"/dev/console" in t.out, t.out
    finally:
        t.close()


def test_full_screen_programs_draw_and_exit(ws, tmp_path):
    require_tools()
    (ws / "notes.txt").write_text("".join(f"line {i} of the notes\n" for i in range(200)))
    env = base_env(tmp_path, TERM="xterm")
    for argv, drawn, keys in ((["less", "notes.txt"], b"line 5 of the notes", b"q"),
                              (["vim", "-u", "NONE", "-N", "-n", "notes.txt"], b"line 5 of the notes", b"\x1b:q!\r")):
        t = Term(firma_cmd("run", "--quiet", "--", *argv), ws, env)
        try:
            fcntl.ioctl(t.master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            before = t.initial
            assert drawn in t.read(15, drawn), (argv, t.out[-300:])
            assert b"\x1b[" in t.out  # it drew with escape sequences (a real terminal for it)
            t.send(keys)
            assert t.wait() == 0, (argv, t.out[-300:])
            assert t.attrs() == before
        finally:
            t.close()


def test_the_exec_gate_keeps_the_terminal_its_own(ws, tmp_path):
    """With a seccomp policy denying system.execute, the exec gate runs between setsid -c and the
    agent: the agent still leads its session on its own pty (job control, /dev/tty)."""
    require_tools()
    pol = tmp_path / "seccomp.toml"
    pol.write_text('policy_id = "tty"\npolicy_version = "1"\ndefault_action = "allow"\ndeny_actions = ["system.execute"]\n')
    cfg = tmp_path / "firma.toml"
    cfg.write_text(f'[run]\nseccomp_policy = {{ source_policy_path = "{pol}", artifact_dir = "{tmp_path / "artifacts"}" }}\n')
    t = Term(firma_cmd("--config", str(cfg), "run", "--quiet", "--", "bash", "--norc", "--noprofile", "-i"), ws,
             base_env(tmp_path, TERM="xterm"))
    try:
        assert b"$ " in t.read(15, b"$ "), t.out
        assert b"no job control" not in t.out
        out = t.send(b"exec 3</dev/tty && echo DEVTTY-$((40+2)); sleep 1 || echo EXEC-$((6*7))\n", b"EXEC-42", secs=10)
        assert b"DEVTTY-42" in out and b"EXEC-42" in out, out  # the policy holds: no second exec
        t.send(b"exit 4\n")
        assert t.wait() == 4
    finally:
        t.close()

"""The agent's own terminal (DESIGN §12a). When firma's stdin and stdout are terminals, the agent
runs on a fresh pseudo-terminal that the launcher owns and relays: the agent is a session leader
with that pty as its controlling terminal (job control, /dev/tty, password prompts, full-screen
programs), the user's terminal is raw while it runs, so ^C and ^Z reach the agent's foreground job
and never firma, and the window size follows (SIGWINCH). The agent never holds the user's real
terminal device: TIOCSTI and the like on its pty reach only itself.

The user's terminal settings are restored on every exit path the launcher lives through (agent
exit, signals, errors); SIGKILL of firma leaves it raw: `reset` (or `stty sane`) fixes that."""

from __future__ import annotations

import fcntl
import os
import termios

_DRAIN_SECS = 0.3


class TerminalRelay:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        try:  # the agent starts with the user's settings and size
            termios.tcsetattr(self.slave, termios.TCSANOW, termios.tcgetattr(0))
        except termios.error:
            pass
        self.resize()
        self._saved: list | None = None
        self.stdin_open = True
        self.pty_open = True  # until the agent's side is closed (EIO)
        self.stderr_too = os.isatty(2)

    def resize(self) -> None:
        try:
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def raw(self) -> None:
        """The user's terminal passes every byte to the agent's pty (saved first)."""
        import tty  # noqa: PLC0415 - only with a terminal

        try:
            self._saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)
        except termios.error:
            self._saved = None

    def restore(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass
            self._saved = None

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def from_user(self) -> None:
        """stdin readable: what the user typed, to the agent."""
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if not data:
            self.stdin_open = False
            return
        try:
            os.write(self.master, data)
        except OSError:
            pass

    def to_user(self) -> bool:
        """The pty readable: what the agent wrote, to the user's terminal; False once it is closed."""
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every slave descriptor is closed
            self.pty_open = False
            return False
        if not data:
            self.pty_open = False
            return False
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                continue
            except OSError:
                return True
            view = view[n:]
        return True

    def drain(self) -> None:
        """After the agent exited: what is still in the pty, to the user."""
        import select  # noqa: PLC0415 - loaded already

        while select.select([self.master], [], [], _DRAIN_SECS)[0]:
            if not self.to_user():
                break

    def close(self) -> None:
        self.restore()
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

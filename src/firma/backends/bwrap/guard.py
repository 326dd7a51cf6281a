"""A held sandbox dies with its launcher, even by SIGKILL (DESIGN §5).

bwrap's `--die-with-parent` covers bwrap itself, but its namespace init sets no parent-death
signal of its own before the release: were the launcher killed while it holds the sandbox, bwrap
would die, and its init would read the end of the release pipe as the release and start the agent
with nobody supervising it (seen: 4 of 60 launchers killed mid-launch). So a guard is forked as
soon as bwrap runs: a process of its own group holding only a pidfd of bwrap, a pidfd of the
launcher, a control socket and a copy of the release pipe's write end (so the pipe cannot end
while it lives). It finds bwrap's init itself, as bwrap's child, within milliseconds (the launcher
also tells it once it knows). When the launcher ends without standing it down, it SIGKILLs the init
(the whole PID namespace with it) and bwrap, then exits. It uses pidfds throughout, so a recycled
pid is never hit."""

from __future__ import annotations

import os
import select
import signal
import socket

from .planting import keep_only

_STAND_DOWN = b"X"
_SEEK_MS = 2  # how often the guard looks for bwrap's init until it has found it
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN,
            signal.SIGTTOU, signal.SIGPIPE)


class Guard:
    def __init__(self, pid: int, ctl: socket.socket) -> None:
        self.pid = pid
        self._ctl: socket.socket | None = ctl

    @classmethod
    def start(cls, bwrap_pid: int, bwrap_pidfd: int, release_w: int) -> "Guard":
        """Fork the guard of the sandbox whose bwrap `bwrap_pidfd` refers to; `release_w`: the
        write end of its release pipe."""
        launcher = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked guard
            try:
                _guard(theirs.fileno(), bwrap_pid, bwrap_pidfd, release_w, launcher)
            finally:
                os._exit(0)
        theirs.close()
        return cls(pid, ours)

    def watch(self, init_pid: int) -> None:
        """The sandbox's init, once known: killed with bwrap if the launcher ends."""
        if self._ctl is not None:
            self._ctl.send(b"I%d" % init_pid)

    def stand_down(self) -> None:
        """The launcher tears the sandbox down itself: the guard exits without acting; reaped."""
        if self._ctl is None:
            return
        try:
            self._ctl.send(_STAND_DOWN)
        except OSError:
            pass
        self._ctl.close()
        self._ctl = None
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _guard(ctl: int, bwrap_pid: int, bwrap_pidfd: int, release_w: int, launcher: int) -> None:  # pragma: no cover
    keep_only((ctl, bwrap_pidfd, release_w))
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    os.setpgid(0, 0)  # a signal to the launcher's group is not for the guard
    targets = [bwrap_pidfd]
    init_found = False
    try:
        launcher_fd = os.pidfd_open(launcher)
    except OSError:
        launcher_fd = -1
    if launcher_fd < 0 or os.getppid() != launcher:
        _kill(_with_init(targets, bwrap_pid))  # the launcher is gone already
        return
    poll = select.poll()
    poll.register(ctl, select.POLLIN)
    poll.register(launcher_fd, select.POLLIN)
    while True:
        if not init_found:
            found = _with_init(targets, bwrap_pid)
            init_found = len(found) > len(targets)
            targets = found
        for fd, _ev in poll.poll(None if init_found else _SEEK_MS):
            if fd == launcher_fd:
                _kill(targets if init_found else _with_init(targets, bwrap_pid))
                return
            msg = os.read(ctl, 64)
            if msg == _STAND_DOWN:
                return
            if not msg:  # the launcher's end closed without standing down: it is ending
                _kill(targets if init_found else _with_init(targets, bwrap_pid))
                return
            if msg.startswith(b"I"):  # the launcher's word (from bwrap's info) counts too
                try:
                    targets = [os.pidfd_open(int(msg[1:])), *targets]
                    init_found = True
                except (OSError, ValueError):
                    pass


def _with_init(targets: list[int], bwrap_pid: int) -> list[int]:  # pragma: no cover - forked guard
    """`targets` with a pidfd of bwrap's child (its namespace init) first, once it exists."""
    try:
        with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children") as f:
            kids = f.read().split()
        return [os.pidfd_open(int(kids[0])), *targets] if kids else targets
    except (OSError, ValueError):
        return targets


def _kill(pidfds: list[int]) -> None:  # pragma: no cover - forked guard
    for fd in pidfds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass

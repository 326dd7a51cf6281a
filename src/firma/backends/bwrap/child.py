"""A running bwrap sandbox seen from outside: its handle (BwrapChild), the sandbox held before
release (HeldSandbox), plain blocking waits (BlockingWaits) and the pidfd helpers that keep
every signal on the process it was meant for."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from typing import TYPE_CHECKING

from ...core import bwrap_plan
from ...core.limits import LimitPlan, limit_notes
from ...core.record import record, field
from ..base import PlantedSockets

if TYPE_CHECKING:
    from .cgroup import RunCgroup
    from .guard import Guard
    from .limiter import Limiter


def pidfd_of(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None



def send(pidfd: int | None, sig: int) -> None:
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, OSError):
        pass


@record(frozen=False)
class BwrapChild:
    """A running sandbox. Signals go through pidfds so a recycled pid is never hit."""

    proc: subprocess.Popen
    proc_pidfd: int  # bwrap itself: readable when it exits (no child-watcher thread needed)
    init_pid: int  # bwrap's PID-namespace init: SIGKILL to it ends every process inside
    init_pidfd: int | None
    agent_pid: int | None = None
    agent_pgid: int | None = None
    agent_pidfd: int | None = None
    cgroup: RunCgroup | None = None  # the run's cgroup, removed at close
    limit_plan: LimitPlan | None = None  # set at release
    limit_notes: tuple[str, ...] = ()  # the limits the run hit, known at close (run summary)
    cgroup_error: str | None = None  # why the run's cgroup could not be removed
    guard: Guard | None = None  # kills the sandbox if the launcher ends without closing it
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        if self.proc.returncode is None:
            import asyncio  # noqa: PLC0415 - only asyncio callers wait this way; firma run does not

            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.proc_pidfd, _resolve, done)
            try:
                await done
            finally:
                loop.remove_reader(self.proc_pidfd)
        return self.status()

    def status(self) -> int:
        """bwrap's exit status (it has exited): the agent's code, or 128+N for signal N."""
        rc = self.proc.wait()
        return rc if rc >= 0 else 128 - rc

    def forward_signal(self, signum: int) -> None:
        # The agent runs in its own session (--new-session), so its process group (its pid)
        # holds it and its background children; bwrap's init is not signalled.
        if self.proc.poll() is not None or self.agent_pgid is None:
            return
        try:
            os.killpg(self.agent_pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_tree(self) -> None:
        send(self.init_pidfd, signal.SIGKILL)
        if self.proc.poll() is None:
            send(self.proc_pidfd, signal.SIGKILL)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.guard is not None:
            self.guard.stand_down()
        for fd in (self.init_pidfd, self.agent_pidfd, self.proc_pidfd):
            if fd is not None:
                os.close(fd)
        counters: dict[str, int] = {}
        if self.cgroup is not None:
            counters = self.cgroup.counters()  # before removal: the run's own counters
            self.cgroup_error = self.cgroup.remove()
        if self.limit_plan is not None:
            self.limit_notes = limit_notes(self.limit_plan, counters, self.status() if self.proc.returncode is not None else None)
        if self.cgroup_error:
            self.limit_notes += (f"warning: teardown: {self.cgroup_error}",)


    async def reap(self, timeout: float) -> bool:
        """Wait up to `timeout` for bwrap to exit (after kill_tree); True once it has. Waits on
        its pidfd without asyncio, so the synchronous launcher can await it too."""
        if self.proc.returncode is None and not select.select([self.proc_pidfd], [], [], timeout)[0]:
            return False
        self.status()
        return True


class BlockingWaits:
    """Plain blocking waits (a `firma.backends.base.Waits`). The synchronous launcher passes
    its own, which also wake on its signal pipe and raise when a termination signal arrived."""

    def readable(self, fd: int, timeout: float) -> bool:
        return bool(select.select([fd], [], [], max(timeout, 0))[0])

    def pause(self, secs: float) -> None:
        time.sleep(secs)


BLOCKING = BlockingWaits()


@record(frozen=False)
class HeldSandbox:
    """A sandbox bwrap has built, holding the agent until `BwrapBackend.release`."""

    child: BwrapChild
    plan: bwrap_plan.BwrapPlan
    socks: PlantedSockets
    block_w: int  # the release pipe: one byte execs the agent
    limiter: Limiter | None = None  # setting the run's limits, joined before release


def kill_and_reap(proc: subprocess.Popen, proc_pidfd: int, child: BwrapChild | None) -> None:
    if child is not None:
        child.kill_tree()
        proc.wait()
        child.close()
    else:
        send(proc_pidfd, signal.SIGKILL)
        proc.wait()
        os.close(proc_pidfd)


def _resolve(done) -> None:
    if not done.done():
        done.set_result(None)

"""Supervision and teardown of a running sandbox (DESIGN §12), for both ways of hosting the
services and for the reference runner: signals forwarded once to the sandbox's process group, a
second termination signal escalates to SIGKILL of the whole run, SIGWINCH forwarded, exit status
kept (128+N for a signal); teardown kills the whole sandbox, reaps it within REAP_TIMEOUT and
closes the services in reverse start order, every step whatever the previous did.

No asyncio import at module level: the synchronous launcher (firma.run.forked) uses this too."""

from __future__ import annotations

import os
import select
import signal
from typing import Any, Callable

from ..backends.base import LaunchedChild

REAP_TIMEOUT = 5.0

TERMINATION = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
FORWARDED = TERMINATION + (signal.SIGWINCH,)


def handled_signals() -> tuple[int, ...]:
    """The FORWARDED signals firma takes over: those its caller did not ignore. `nohup firma run`
    or a background job of a script ignores SIGHUP or SIGINT; firma then neither handles nor
    forwards them, and the agent inherits them ignored, as from any other launcher."""
    return tuple(s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN)


class Interrupted(Exception):
    """A termination signal arrived before the launch completed (the sandbox is then killed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """The launcher's signal handlers: they only record the signal; a wakeup pipe makes every
    wait of the launcher return, and the launcher acts on the recorded signals itself."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending: list[int] = []
        self._old: dict[int, Any] = {}
        self._old_wakeup: int | None = None  # set while installed

    def install(self) -> None:
        self._old_wakeup = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        for s in handled_signals():
            self._old[s] = signal.signal(s, self._record)

    def _record(self, signum: int, _frame) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        try:
            while os.read(self.r, 512):
                pass
        except BlockingIOError:
            pass
        got, self.pending = self.pending, []
        return got

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        for fd in (self.r, self.w):
            os.close(fd)
        self.r = self.w = -1


class LaunchWaits:
    """The backend's waits during the launch (firma.backends.base.Waits), woken by
    signals: a termination signal raises Interrupted, SIGWINCH has no agent to go to yet."""

    def __init__(self, signals: Signals) -> None:
        self._signals = signals
        self.early: int | None = None

    def check(self) -> None:
        for s in self._signals.take():
            if s in TERMINATION and self.early is None:
                self.early = s
        if self.early is not None:
            raise Interrupted(self.early)

    def readable(self, fd: int, timeout: float) -> bool:
        ready = select.select([fd, self._signals.r], [], [], max(timeout, 0))[0]
        self.check()
        return fd in ready

    def pause(self, secs: float) -> None:
        select.select([self._signals.r], [], [], secs)
        self.check()


def cancel_current_task() -> Callable[[int], None]:
    """An `on_early_signal` for asyncio launchers: the signal cancels the task running the launch,
    which then tears down and reports 128+N."""
    import asyncio  # noqa: PLC0415 - asyncio launchers only; the synchronous one never imports it

    task = asyncio.current_task()

    def cancel(_signum: int) -> None:
        if task is not None:
            task.cancel()

    return cancel


class Supervisor:
    """Owns the launcher's signal handlers for one run.

    Before the child exists a termination signal calls `on_early_signal` (the in-process hosting cancels
    the launch and tears down); `early_signal` then holds it for the exit status."""

    def __init__(self, on_early_signal: Callable[[int], None]) -> None:
        self._on_early = on_early_signal
        self._child: LaunchedChild | None = None
        self._terminations = 0
        self.early_signal: int | None = None
        self.escalated = False
        self._loop: Any = None  # the running asyncio loop, once installed

    def install(self) -> None:
        import asyncio  # noqa: PLC0415 - the constants above serve the synchronous launcher too

        self._loop = asyncio.get_running_loop()
        for s in handled_signals():
            self._loop.add_signal_handler(s, self.handle, s)

    def uninstall(self) -> None:
        if self._loop is None:
            return
        for s in FORWARDED:
            try:
                self._loop.remove_signal_handler(s)
            except (ValueError, RuntimeError):
                pass
        self._loop = None

    def attach(self, child: LaunchedChild) -> None:
        self._child = child

    def handle(self, signum: int) -> None:
        """What a signal means for the run (the asyncio handler, or the synchronous launcher's
        loop, calls this): forwarded once, a second termination kills the whole sandbox."""
        if signum in TERMINATION:
            self._terminations += 1
        child = self._child
        if child is None:
            if signum in TERMINATION and self.early_signal is None:
                self.early_signal = signum
                self._on_early(signum)
            return
        if signum in TERMINATION and self._terminations > 1:
            self.escalated = True
            child.kill_tree()
            return
        child.forward_signal(signum)

    async def wait(self) -> int:
        assert self._child is not None
        return await self._child.wait()


# --- teardown -------------------------------------------------------------------------------


async def stop_child(child: LaunchedChild, log: Callable[..., None]) -> None:
    """SIGKILL every process of the run and reap it, so nothing of the run survives the launcher."""
    try:
        child.kill_tree()
        if not await child.reap(REAP_TIMEOUT):
            log(f"teardown: the sandbox did not exit within {REAP_TIMEOUT:g}s of SIGKILL", "error")
    except Exception as exc:  # noqa: BLE001 - teardown goes on whatever this step did
        log(f"teardown: sandbox: {exc}", "error")
    child.close()


async def close_services(services: list[Any], log: Callable[..., None]) -> None:
    """Close the services (bridge, DNS stub, sidecar, relays...) in reverse start order."""
    for svc in reversed(services):
        try:
            await svc.aclose()
        except Exception as exc:  # noqa: BLE001 - the next service closes anyway
            log(f"teardown: {type(svc).__name__}: {exc}", "error")

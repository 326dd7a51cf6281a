"""Supervision of a running sandbox (SPEC §12): signals forwarded once to the sandbox's process
group, a second termination signal escalates to SIGKILL of the whole run, SIGWINCH forwarded,
exit status kept (128+N for a signal)."""

from __future__ import annotations

import signal
from typing import Callable

from ..backends.base import LaunchedChild

TERMINATION = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
FORWARDED = TERMINATION + (signal.SIGWINCH,)


def handled_signals() -> tuple[int, ...]:
    """The FORWARDED signals firma takes over: those its caller did not ignore. `nohup firma run`
    or a background job of a script ignores SIGHUP or SIGINT; firma then neither handles nor
    forwards them, and the agent inherits them ignored, as from any other launcher."""
    return tuple(s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN)


class Supervisor:
    """Owns the launcher's signal handlers for one run.

    Before the child exists a termination signal calls `on_early_signal` (the lifecycle cancels
    the launch and tears down); `early_signal` then holds it for the exit status."""

    def __init__(self, on_early_signal: Callable[[int], None]) -> None:
        self._on_early = on_early_signal
        self._child: LaunchedChild | None = None
        self._terminations = 0
        self.early_signal: int | None = None
        self.escalated = False
        self._loop = None  # the running asyncio loop, once installed

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

"""The run's limits set on a thread while the launch goes on (DESIGN §5.3). Started once bwrap has
started (never while the launcher forks a child that runs Python before exec): the run's cgroup
is made and its limits written while bwrap builds the sandbox; once the held
sandbox's pids are known (`attach`) they are moved in, then its init's rlimits are set. The
launcher's main thread joins it before the release; nothing of the agent runs before that."""

from __future__ import annotations

import threading

from . import rlimits
from ...errors import LaunchError
from .cgroup import RunCgroup


RESULT_TIMEOUT = 10.0  # making a cgroup and setting rlimits takes milliseconds


class Limiter(threading.Thread):
    def __init__(self, cgroup: RunCgroup | None, rlimits_: tuple[tuple[str, int], ...]) -> None:
        super().__init__(name="firma-limits", daemon=True)
        self.cgroup = cgroup
        self._rlimits = rlimits_
        self._pids: tuple[int, int] | None = None
        self._as_ids: tuple[int, int] | None = None
        self._attached = threading.Event()
        self._got: dict[str, tuple[int, int]] = {}
        self._error: BaseException | None = None

    def attach(self, pids: tuple[int, int] | None, as_ids: tuple[int, int] | None = None) -> None:
        """The held sandbox's (bwrap, init) pids; None when the launch is abandoned."""
        self._pids, self._as_ids = pids, as_ids
        self._attached.set()

    def _wait_pids(self) -> tuple[int, ...] | None:
        self._attached.wait()
        return self._pids

    def run(self) -> None:
        # Imports happen in the launcher's thread (above), never here: a fork the main thread
        # makes meanwhile (the planting helper) must not inherit a held import lock.
        try:
            if self.cgroup is not None:
                self.cgroup.create(self._wait_pids)
            pids = self._wait_pids()
            if pids is not None:
                self._got = rlimits.apply(pids[1], self._rlimits, self._as_ids)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the launcher's thread by result()
            self._error = exc

    def abandon(self) -> None:
        """The launch stops: let the thread end without touching a sandbox, and wait for it."""
        if self.ident is None:  # never started (bwrap did not start)
            return
        if not self._attached.is_set():
            self.attach(None)
        self.join(RESULT_TIMEOUT)  # a daemon thread: one that hangs does not hold the launcher

    def result(self) -> dict[str, tuple[int, int]]:
        """The rlimits read back, by name, once the thread is done; raises what it raised. A
        thread that does not end within RESULT_TIMEOUT fails the launch rather than hang it."""
        self.join(RESULT_TIMEOUT)
        if self.is_alive():
            raise LaunchError(f"the run's limits were not in place within {RESULT_TIMEOUT:g}s; refusing to start the agent")
        if self._error is not None:
            raise self._error
        return self._got

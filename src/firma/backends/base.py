"""The contract between the launch sequence (firma.run) and a backend.

A backend turns an `ExecutionEnvelope` into a running, confined child. It gets every input from
the plan/envelope and platform facts from a `Host`; it never reads `os.environ`."""

from __future__ import annotations

import socket
from enum import Enum
from typing import Awaitable, Callable, Protocol

from ..core.model import Check, EnforcementProof, ExecutionEnvelope, RunPlan
from ..core.record import record, field
from ..core.hostfacts import Host
from ..core.limits import LimitPlan, not_enforced
from ..errors import LaunchError


class RoutingMode(Enum):
    # Services are served from sockets planted inside the sandbox's network namespace (bwrap).
    PLANTED = "planted"
    # Services listen on host loopback ephemeral ports; the backend/runner confines the agent to them.
    HOST_LOOPBACK = "host_loopback"


@record
class RoutingPlan:
    mode: RoutingMode
    dns_stub: bool  # a DNS refusal stub must exist (planted, or on host loopback)
    # The agent's environment must carry FIRMA_DNS_STUB_ADDR=<host stub host:port> (vz structural
    # modes: sandbox-exec network-deny and guest; DESIGN §6).
    export_dns_stub_env: bool = False


@record(frozen=False)
class PlantedSockets:
    """Listening sockets created inside the sandbox's netns, owned by the launcher."""

    proxy_tcp: socket.socket  # 127.0.0.1:18080
    dns_udp: socket.socket  # 127.0.0.1:53
    dns_tcp: socket.socket  # 127.0.0.1:53
    # transparent egress (DESIGN §5.4): 0.0.0.0:P (and [::]:P with IPv6) for each planted port
    transparent: tuple[socket.socket, ...] = ()
    ipv6: bool = False  # the sandbox's namespace has IPv6 (its routes and listeners too)
    # --publish: a helper in the sandbox's network namespace handing out sockets of it, one per
    # byte written to `factory` (its pid: the launcher's child, reaped at close)
    factory: socket.socket | None = None
    factory_pid: int | None = None

    def close(self) -> None:
        for s in (self.proxy_tcp, self.dns_udp, self.dns_tcp, *self.transparent):
            s.close()
        if self.factory is not None:
            self.factory.close()  # the helper exits at EOF, once every copy is closed

    def reap_factory(self) -> None:
        """The launcher, at teardown: end and reap the --publish helper (its child)."""
        if self.factory_pid is None:
            return
        import os  # noqa: PLC0415 - only with --publish
        import signal  # noqa: PLC0415 - only with --publish

        try:
            os.kill(self.factory_pid, signal.SIGKILL)
            os.waitpid(self.factory_pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.factory_pid = None


AddCheck = Callable[[Check], None]  # records a measured launch-time fact for the proof


@record(frozen=False)
class LaunchHooks:
    """Callbacks the launch sequence gives a backend for `launch`.

    `serve_planted` is awaited by planting backends after the sockets exist and before the agent
    is released; it returns once the services are serving them. `add_check` records a measured
    launch-time fact for the proof."""

    serve_planted: Callable[[PlantedSockets], Awaitable[None]]
    add_check: AddCheck
    log: Callable[[str], None] = field(default=lambda _msg: None)


class LaunchedChild(Protocol):
    @property
    def pid(self) -> int: ...

    async def wait(self) -> int:
        """Wait for the child; return its exit code, or 128+N when it died of signal N."""

    def forward_signal(self, signum: int) -> None:
        """Deliver a signal to the sandbox's process group (or the runner's)."""

    def kill_tree(self) -> None:
        """SIGKILL every process of the run; idempotent."""

    async def reap(self, timeout: float) -> bool:
        """After kill_tree: wait up to `timeout` for the child to end; True once it has."""

    def close(self) -> None:
        """Release the handles held on the child (idempotent)."""

    @property
    def limit_notes(self) -> tuple[str, ...]:
        """After close: one line per resource limit the run hit (run summary)."""


class Backend(Protocol):
    name: str

    def prepare(self, plan: RunPlan, host: Host) -> EnforcementProof:
        """Validate host and inputs (typed errors, no side effects) and return the proof."""

    def routing(self) -> RoutingPlan:
        """Where services must live; valid after `prepare`."""

    async def launch(self, envelope: ExecutionEnvelope, hooks: LaunchHooks) -> LaunchedChild:
        """Start the confined child; for PLANTED routing, plant sockets and await
        `hooks.serve_planted` before releasing the agent."""


class Waits(Protocol):
    """How a planting backend waits during build and release: the synchronous launcher's waits
    also wake on its signals (and raise when a termination signal arrived)."""

    def readable(self, fd: int, timeout: float) -> bool:
        """Wait up to `timeout` for `fd` to be readable."""

    def pause(self, secs: float) -> None:
        """Sleep `secs`."""


class PlantedChild(LaunchedChild, Protocol):
    """A released sandbox the synchronous launcher supervises without asyncio."""

    proc_pidfd: int  # readable once the sandbox has exited

    def status(self) -> int:
        """The exit status once it has exited: the agent's code, or 128+N for signal N."""


class HeldSandbox(Protocol):
    """A built sandbox holding its agent until `release`; its planted sockets are listening."""

    socks: PlantedSockets


class PlantingBackend(Backend, Protocol):
    """A backend with PLANTED routing: the launch is split around the services, so the launcher
    can serve the planted sockets from another process.

    `build` spawns the sandbox holding the agent and plants the sockets; `release` measures the
    sandbox, releases the agent and returns it; `abort` kills a built sandbox that will not be
    released. On failure `build` and `release` leave nothing of the sandbox; the planted sockets
    stay the caller's to close."""

    def build(
        self, envelope: ExecutionEnvelope, add_check: AddCheck, log: Callable[[str], None], waits: Waits,
        terminal: int | None = None, terminal_stderr: bool = False,
    ) -> HeldSandbox:
        """Spawn the sandbox holding the agent and plant the sockets (`held.socks`). `terminal`:
        the pty slave to give the agent as stdin and stdout (and stderr with `terminal_stderr`)."""

    def release(self, held: HeldSandbox, add_check: AddCheck, waits: Waits) -> PlantedChild:
        """Verify the sandbox from outside, release the agent, verify its credentials."""

    def abort(self, held: HeldSandbox) -> None:
        """Kill and reap a built sandbox that will not be released (idempotent)."""


def refuse_unenforceable(plan: RunPlan, backend: str) -> LimitPlan:
    """What launch contract v1 cannot carry: `[run].mask_paths` and the resource limits. The
    launch is refused rather than run with less than the user asked for (a limit: unless
    `--limits best-effort`); the limits entry of the proof says none is enforced by firma."""
    refuse_mask_paths(plan, backend)
    if plan.publish:
        raise LaunchError(f"--publish needs the bwrap backend (it reaches the agent's port from outside); the "
                          f"{backend} backend cannot; drop --publish or use the bwrap backend")
    if plan.workspace_read_only:
        raise LaunchError(f"--read-only is enforced by the bwrap backend only; the {backend} backend would leave "
                          "the workspace writable; drop --read-only or use the bwrap backend")
    return not_enforced(plan.limits, backend)


def refuse_mask_paths(plan: RunPlan, backend: str) -> None:
    """`[run].mask_paths` is enforced by the bwrap backend only: elsewhere the launch is refused
    rather than run with paths shown that the user asked to hide."""
    if plan.mask_paths:
        raise LaunchError(
            f"[run].mask_paths is not enforced by the {backend} backend; remove it or use the bwrap backend"
        )

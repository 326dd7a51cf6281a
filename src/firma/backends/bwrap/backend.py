"""bubblewrap backend (DESIGN §5): structural network confinement on Linux.

The sandbox gets its own user, network, PID, IPC and UTS namespaces; the only endpoints in its
network namespace are the sockets planted by the launcher. The backend knows nothing about the
sidecar. A launch is two synchronous steps around the services: `build` spawns bwrap blocked,
reads where the sandbox is and plants; `release` measures, releases the agent and verifies its
credentials from outside. `firma run` calls them from its synchronous launcher (firma.run.forked);
the asyncio `launch` wraps them around `hooks.serve_planted` for the reference Linux runner.
Waits go through a `Waits` value so the launcher can wake on signals while it waits. The checks
from outside live in verify.py, the host facts for the pure plan in facts.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

from ...core import bwrap_plan, egress, limits
from ...core.limits import LimitPlan
from ...core.hostfacts import Host
from ...core.model import (
    PLANTED_DNS_ADDR,
    Check,
    EnforcementProof,
    ExecutionEnvelope,
    NetworkConfinement,
    RunPlan,
)
from ...errors import LaunchError, SeccompError
from ...host import detect_host
from ..base import AddCheck, LaunchHooks, RoutingMode, RoutingPlan, Waits
from ..preflight import bwrap_preflight
from .child import BLOCKING, BwrapChild, HeldSandbox, kill_and_reap, pidfd_of, send
from .limiter import Limiter
from .command import require_command
from .facts import git_refs, kind_of, measure_facts
from .idmap import StagedClones
from .guard import Guard
from .planting import Addresses, netns_interfaces, plant, socket_factory
from .verify import (
    bwrap_gave_up,
    mount_table,
    verify_agent,
    verify_kernel_read_only,
    verify_masks,
    verify_protected,
    verify_resolv_conf,
    verify_transparent,
)

DETAIL = (
    "network namespace isolation enabled with sandbox-local proxy bridge and DNS stub paths"
)
_INFO_TIMEOUT = 10.0


def open_seccomp(envelope: ExecutionEnvelope) -> int | None:
    """A read-only descriptor of the seccomp filter for `bwrap --seccomp FD` (DESIGN §10).

    firma's own artifact (the envelope's seccomp_artifact, from firma run) is opened through
    `firma.seccomp.store.open_verified`, which checks sha256, metadata, owner, mode and symlinks
    through the descriptor it returns. A bare path (a runner enforcing a contract) is opened
    without following links and must be a regular file owned by us and not writable by others.
    Anything else refuses the launch: a filter is never dropped."""
    path = envelope.seccomp_filter_path
    if path is None:
        return None
    if envelope.seccomp_artifact is not None:
        from ...seccomp import store as seccomp  # noqa: PLC0415 - Linux only

        if envelope.seccomp_artifact.path != path:
            raise SeccompError(f"seccomp filter {path} is not the envelope's artifact {envelope.seccomp_artifact.path}")
        return seccomp.open_verified(envelope.seccomp_artifact)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SeccompError(f"seccomp filter {path} cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        raise SeccompError(
            f"seccomp filter {path} must be a regular file owned by uid {os.getuid()} and not "
            "writable by group or others"
        )
    return fd


def _exits_within(proc: subprocess.Popen, secs: float) -> bool:
    try:
        proc.wait(secs)
        return True
    except subprocess.TimeoutExpired:
        return False


def _read_info(fd: int, timeout: float, waits: Waits) -> dict:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if not waits.readable(fd, deadline - time.monotonic()):
            raise LaunchError("bwrap did not report its sandbox in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf.extend(chunk)
        if buf.rstrip().endswith(b"}"):
            break
    try:
        return json.loads(bytes(buf))
    except ValueError:
        raise LaunchError(
            "bwrap failed before the sandbox started (its reason is printed above); if it names a "
            "uid map, a namespace or a permission, this host blocks unprivileged user namespaces "
            "(AppArmor, a container's seccomp profile): run `firma doctor` for the fix"
        ) from None


def _options_fd(plan: bwrap_plan.BwrapPlan) -> int:
    """A sealed-by-position memfd holding bwrap's options (see bwrap_plan.options_blob)."""
    try:
        blob = bwrap_plan.options_blob(plan)
    except ValueError as exc:
        raise LaunchError(f"cannot pass the sandbox options: {exc}; remove NUL bytes from the environment") from None
    fd = os.memfd_create("firma-bwrap-args", os.MFD_CLOEXEC)
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class BwrapBackend:
    """The bwrap backend: a `PlantingBackend` (build, release, abort) for `firma run` and an
    asyncio `launch` (the three around `hooks.serve_planted`) for the reference runner."""

    name = "bwrap"

    def __init__(self, host: Host | None = None) -> None:
        self._host = host
        self._protected_extra: tuple[str, ...] = ()  # from the RunPlan (prepare); none for a runner
        self._limits: LimitPlan | None = None  # from the RunPlan (prepare); none for a runner
        self._sandbox_id = ""
        self._transparent_ports: tuple[int, ...] = ()  # from the RunPlan (prepare); none for a runner
        self._publish = False  # --publish (prepare): a socket factory in the sandbox's netns

    def prepare(self, plan: RunPlan, host: Host) -> EnforcementProof:
        bwrap_preflight(host)
        require_command(plan, host)
        self._host = host
        self._protected_extra = bwrap_plan.plan_protected(plan)
        self._refuse_protected_symlinks(plan.cwd)  # before any service starts
        for m in plan.mounts:
            if not m.generated and not os.path.exists(m.source):
                raise LaunchError(f"mount source {m.source} does not exist; create it or fix --mount / --allow-write / "
                                  "[run].mounts")
        self._publish = bool(plan.publish)
        self._transparent_ports = egress.transparent_ports(
            plan.allow_hosts + plan.allow_tcp, cedar=plan.policy_path is not None, monitor=plan.monitor,
            external=not plan.sidecar.embedded)
        self._limits = limits.plan_limits(plan.limits, host.cgroups, host.rlimits)
        self._limits = self._limits.with_entry(
            limits.tmpfs_entry(bwrap_plan.tmpfs_bytes(host.mem_total, self._limits.memory), counted=self._limits.memory is not None))
        return EnforcementProof(
            backend="bwrap",
            structural=True,
            fail_closed=True,
            network_confinement=NetworkConfinement.LINUX_NETWORK_NAMESPACE,
            detail=DETAIL,
            limits=self._limits,
        )

    def routing(self) -> RoutingPlan:
        return RoutingPlan(mode=RoutingMode.PLANTED, dns_stub=True)

    def plan_for(
        self, envelope: ExecutionEnvelope, **fds: int | None
    ) -> bwrap_plan.BwrapPlan:
        host = self._host or detect_host()
        facts = measure_facts(envelope, host, self._protected_extra,
                              self._limits.memory if self._limits is not None else None)
        return bwrap_plan.build(
            envelope, facts, bwrap=host.bwrap_path or "bwrap", protected_extra=self._protected_extra, **fds
        )

    def _refuse_protected_symlinks(self, cwd: str) -> None:
        """A protected workspace name that is a symlink is refused, never followed (ATTACKS #36)."""
        extra = self._protected_extra + git_refs(cwd)
        kinds = {p: k for p in bwrap_plan.protected_candidates(cwd, extra) if (k := kind_of(p))}
        links = bwrap_plan.protection(cwd, extra, kinds).symlinks
        if links:
            raise bwrap_plan.symlink_error(links[0])

    def build(
        self, envelope: ExecutionEnvelope, add_check: AddCheck, log=lambda _m: None, waits: Waits = BLOCKING,
        terminal: int | None = None, terminal_stderr: bool = False,
    ) -> HeldSandbox:
        """Spawn bwrap holding the agent, read where the sandbox is, check that its network
        namespace has only `lo`, and plant the proxy and DNS sockets in it. On failure nothing
        of the sandbox is left."""
        if self._host is None:
            self._host = detect_host()
        bwrap_preflight(self._host)
        self._sandbox_id = envelope.sandbox_id
        # The run's cgroup is made while bwrap builds the sandbox (§5.3); its thread starts
        # once bwrap has started (see _build).
        limiter = self._make_limits()
        try:
            return self._build(envelope, add_check, log, waits, limiter, terminal, terminal_stderr)
        except BaseException:
            if limiter is not None:
                limiter.abandon()
                if limiter.cgroup is not None:
                    limiter.cgroup.remove()  # nothing of the sandbox is in it any more
            raise

    def _build(self, envelope: ExecutionEnvelope, add_check: AddCheck, log, waits: Waits, limiter: Limiter | None,
               terminal: int | None, terminal_stderr: bool) -> HeldSandbox:
        self._refuse_protected_symlinks(envelope.cwd)  # before any descriptor is opened
        seccomp_fd = open_seccomp(envelope)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        try:
            plan = self.plan_for(envelope, info_fd=info_w, block_fd=block_r, seccomp_fd=seccomp_fd)
        except LaunchError:  # a protected name turned into a symlink since the check above
            for fd in (info_r, info_w, block_r, block_w, seccomp_fd):
                if fd is not None:
                    os.close(fd)
            raise
        if seccomp_fd is not None:
            add_check(Check("seccomp_filter", True, f"bwrap --seccomp with {envelope.seccomp_filter_path}"))
        for f in plan.files:
            fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f.content)
        args_fd = _options_fd(plan)
        passed = [info_w, block_r, args_fd] + ([seccomp_fd] if seccomp_fd is not None else [])
        clones: StagedClones | None = None
        try:
            # A root caller's agent gets an unprivileged host uid: the child stages idmapped
            # clones in a private mount namespace and drops to that uid before bwrap starts.
            clones = StagedClones(plan) if plan.staged else None
            # Own process group: a terminal's ^C reaches firma only, which forwards it. Plain
            # Popen + pidfd: no child-watcher thread exists before the planting fork.
            # With a terminal of its own (run.terminal) the agent's stdio is that pty's slave.
            proc = subprocess.Popen(
                bwrap_plan.exec_argv(plan, args_fd), pass_fds=passed, start_new_session=True,
                preexec_fn=clones.enter if clones is not None else None,
                stdin=terminal, stdout=terminal, stderr=terminal if terminal_stderr else None,
            )
            proc_pidfd = os.pidfd_open(proc.pid)
            # Before anything else, and before any thread starts: the held sandbox must die with
            # the launcher (guard.py says why bwrap alone does not do it).
            try:
                guard = Guard.start(proc.pid, proc_pidfd, block_w)
            except OSError:
                send(proc_pidfd, signal.SIGKILL)
                proc.wait()
                os.close(proc_pidfd)
                raise
            if limiter is not None:
                # Only now: no thread of the launcher may run while the child runs Python
                # between fork and exec (the idmap staging, a preexec_fn), nor while Popen
                # forks: a lock another thread held at the fork stays held in the child forever.
                limiter.start()
        except (OSError, LaunchError, subprocess.SubprocessError) as exc:
            why = clones.failure() if clones is not None and isinstance(exc, subprocess.SubprocessError) else ""
            for fd in passed + [info_r, block_w]:
                os.close(fd)
            if clones is not None:
                clones.close()
            if isinstance(exc, LaunchError):
                raise
            if why:
                raise LaunchError(
                    f"cannot give the agent an unprivileged uid (idmapped workspace): {why}; "
                    "run firma as a normal user instead"
                ) from None
            raise LaunchError(f"cannot start bwrap: {getattr(exc, 'strerror', None) or exc}") from None
        for fd in passed:
            os.close(fd)
        if clones is not None:
            clones.close()  # attached in the child's namespace; ours are no longer needed
        child: BwrapChild | None = None
        try:
            info = _read_info(info_r, _INFO_TIMEOUT, waits)
            init_pid = int(info["child-pid"])
            child = BwrapChild(proc=proc, proc_pidfd=proc_pidfd, init_pid=init_pid, init_pidfd=pidfd_of(init_pid),
                               guard=guard)
            guard.watch(init_pid)
            log(f"sandbox init pid {init_pid}")
            if limiter is not None:
                child.cgroup = limiter.cgroup  # removed with the child, whatever happens next
                as_ids = None if plan.agent_host_uid == os.geteuid() else (plan.agent_host_uid, plan.agent_host_gid)
                limiter.attach((proc.pid, init_pid), as_ids)

            ifaces = netns_interfaces(init_pid)
            ok = ifaces == ["lo"]
            add_check(Check("netns_only_loopback", ok, "interfaces: " + ",".join(ifaces)))
            if not ok:
                raise LaunchError(f"sandbox network namespace has unexpected interfaces: {ifaces}")
            socks = plant(init_pid, Addresses(transparent_ports=self._transparent_ports))
            if self._publish:
                try:
                    socks.factory_pid, socks.factory = socket_factory(init_pid)
                except BaseException:
                    socks.close()
                    raise
            add_check(
                Check(
                    "planted_sockets",
                    True,
                    "proxy 127.0.0.1:18080/tcp, dns %s:%d/udp+tcp in the sandbox netns"
                    % PLANTED_DNS_ADDR,
                )
            )

            return HeldSandbox(child=child, plan=plan, socks=socks, block_w=block_w, limiter=limiter)
        except BaseException as exc:
            # Reading the sandbox from outside fails once bwrap has given up building it (its
            # init is gone): that is bwrap's failure, with its reason on stderr.
            # (Before bwrap reported the sandbox, _read_info has said what happened already.)
            gave_up = child is not None and isinstance(exc, (OSError, LaunchError)) and _exits_within(proc, 0.5)
            os.close(block_w)
            if limiter is not None:
                limiter.abandon()  # before the child's close removes its cgroup
            kill_and_reap(proc, proc_pidfd, child)
            guard.stand_down()  # (the child's close did, if there was one)
            if gave_up and proc.returncode not in (0, -signal.SIGKILL):
                raise bwrap_gave_up() from None
            raise
        finally:
            os.close(info_r)

    def release(self, held: HeldSandbox, add_check: AddCheck, waits: Waits = BLOCKING) -> BwrapChild:
        """Measure the built sandbox from outside (resolv.conf, then one read of its mount table for
        the masks, the read-only kernel interfaces and the protected paths), release
        the agent, and read its credentials. On failure the sandbox is killed and reaped; the
        planted sockets stay the caller's to close."""
        child = held.child
        try:
            verify_resolv_conf(child, add_check, waits)
            top = mount_table(child.init_pid)  # final: bwrap built the mounts before it blocked
            verify_transparent(child.init_pid, self._transparent_ports, held.socks.ipv6, add_check)
            verify_masks(top, held.plan, add_check)
            verify_kernel_read_only(top, add_check)
            verify_protected(top, held.plan, add_check)
            self._finish_limits(child, top, add_check, held.limiter)
            os.write(held.block_w, b"1")  # release: bwrap execs the agent
            os.close(held.block_w)
            held.block_w = -1
            verify_agent(child, held.plan, add_check, waits)
            return child
        except BaseException:
            self.abort(held)
            raise

    def _make_limits(self) -> Limiter | None:
        """The run's limits, on a thread (started by `_build` once bwrap has started): the cgroup
        is made and its limits written while bwrap builds the sandbox; once the held sandbox's
        pids are attached they are moved in and its init's rlimits set. The first move into a
        cgroup waits for an RCU grace period (~10 ms here), which this way overlaps the launch
        instead of adding to it."""
        lp = self._limits
        if lp is None:  # a runner's launch: contract v1 carries no limits
            return None
        cg = None
        if lp.cgroup_parents:
            from .cgroup import RunCgroup  # noqa: PLC0415 - only with a cgroup

            cg = RunCgroup(lp, "firma-" + self._sandbox_id)
        return Limiter(cg, lp.rlimits)

    def _finish_limits(self, child: BwrapChild, top, add_check: AddCheck, limiter: Limiter | None) -> None:
        """Before release: the limits are in place, read back; the sandbox's processes are in the
        run's group; every cgroup mount is read-only inside (DESIGN §5.3)."""
        lp = self._limits
        if lp is None or limiter is None:
            return
        got = limiter.result()  # raises what the thread raised
        detail: list[str] = []
        cg = limiter.cgroup
        if cg is not None:
            if not all(cg.holds(p) for p in (child.pid, child.init_pid)):
                raise LaunchError("the sandbox's processes are not in the run's cgroup; refusing to start the agent")
            # The agent must not write its own limits: every cgroup mount is read-only inside.
            writable = [m for m, opts in top.items() if m.startswith("/sys/fs/cgroup") and "ro" not in opts]
            if writable:
                raise LaunchError(f"cgroup mounts writable in the sandbox: {', '.join(writable)}; refusing to start the agent")
            detail.append(f"cgroup {lp.cgroup_version} {', '.join(cg.unique_dirs)} holds the sandbox (read from /proc/<pid>/cgroup), "
                          "cgroup mounts read-only inside")
        detail.append("rlimits read back: " + (", ".join(f"{n} {s}/{h}" for n, (s, h) in got.items()) or "none"))
        detail += [f"{e.name} {e.value}: {e.mechanism}" + ("" if e.enforced else " (not enforced)")
                   for e in lp.entries]
        child.limit_plan = lp
        add_check(Check("limits", True, "; ".join(detail)))

    @staticmethod
    def abort(held: HeldSandbox) -> None:
        """Kill and reap a sandbox that will not be released (idempotent)."""
        if held.block_w >= 0:
            os.close(held.block_w)
            held.block_w = -1
        if held.limiter is not None:
            held.limiter.abandon()  # its cgroup is removed with the child, once it is done with it
        if not held.child.closed:
            kill_and_reap(held.child.proc, held.child.proc_pidfd, held.child)

    async def launch(self, envelope: ExecutionEnvelope, hooks: LaunchHooks) -> BwrapChild:
        """`build`, await `hooks.serve_planted`, `release`. The waits of build and release block
        the event loop; they are bounded and last a few milliseconds."""
        held = self.build(envelope, hooks.add_check, hooks.log)
        try:
            await hooks.serve_planted(held.socks)
        except BaseException:
            held.socks.close()
            self.abort(held)
            raise
        return self.release(held, hooks.add_check)

"""bubblewrap backend (SPEC §5): structural network confinement on Linux.

The sandbox gets its own user, network, PID, IPC and UTS namespaces; the only endpoints in its
network namespace are the sockets planted by the launcher. The backend knows nothing about the
sidecar. A launch is two synchronous steps around the services: `build` spawns bwrap blocked,
reads where the sandbox is and plants; `release` measures, releases the agent and verifies its
credentials from outside. `firma run` calls them from its synchronous launcher (firma.run.forked);
the asyncio `launch` wraps them around `hooks.serve_planted` for the reference Linux runner.
Waits go through a `Waits` value so the launcher can wake on signals while it waits."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import subprocess
import time

from ...core import bwrap_plan
from ...core.model import (
    PLANTED_DNS_ADDR,
    Check,
    EnforcementProof,
    ExecutionEnvelope,
    NetworkConfinement,
    RunPlan,
)
from ...core.record import record, field
from ...errors import LaunchError, SeccompError
from ...core.hostfacts import Host
from ...host import detect_host, which
from .planting import netns_interfaces, plant
from ..preflight import bwrap_preflight
from ..base import LaunchHooks, PlantedSockets, RoutingMode, RoutingPlan

DETAIL = (
    "network namespace isolation enabled with sandbox-local proxy bridge and DNS stub paths"
)
_INFO_TIMEOUT = 10.0
_CRED_TIMEOUT = 5.0


def _kind_of(p: str) -> str | None:
    """The kind of `p` itself (lstat: a final symlink is reported, not followed)."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return bwrap_plan.SYMLINK
    return bwrap_plan.DIR if stat.S_ISDIR(st.st_mode) else bwrap_plan.FILE


def _read_small(path: str) -> str | None:
    """A regular file's text (up to GIT_CONFIG_MAX bytes), never through a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, bwrap_plan.GIT_CONFIG_MAX).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def git_refs(cwd: str) -> tuple[str, ...]:
    """Workspace paths the repository's own git config names (core.hooksPath; include.path,
    followed while the included files are in the workspace): hooks there run on the host too."""
    git = os.path.join(cwd, bwrap_plan.GIT_DIR)
    if _kind_of(git) != bwrap_plan.DIR:
        return ()
    refs: list[str] = []
    todo, seen = [os.path.join(git, "config")], set()
    while todo and len(seen) < 16:
        cfg = todo.pop()
        if cfg in seen:
            continue
        seen.add(cfg)
        text = _read_small(cfg)
        if text is None:
            continue
        hooks, includes = bwrap_plan.git_config_refs(text, os.path.dirname(cfg), cwd)
        refs += hooks
        for inc in includes:
            if _within(inc, cwd):
                refs.append(inc)
                todo.append(inc)
    return tuple(dict.fromkeys(r for r in refs if r != cwd and _within(r, cwd)))


def _xdg_runtime_dir(host: Host) -> str | None:
    """$XDG_RUNTIME_DIR when it is an absolute path (the sandbox puts a fresh tmpfs there)."""
    xdg = host.environ.get("XDG_RUNTIME_DIR", "").strip()
    return xdg if xdg.startswith("/") else None


def measure_facts(
    envelope: ExecutionEnvelope, host: Host, protected_extra: tuple[str, ...] = ()
) -> bwrap_plan.BwrapFacts:
    """lstat the candidate paths on the host (the plan itself stays pure)."""
    xdg = _xdg_runtime_dir(host)
    state_root = os.path.dirname(os.path.dirname(envelope.runtime_dir.rstrip("/")))
    kinds: dict[str, str] = {}
    realpaths: dict[str, str] = {}
    kind_of = _kind_of
    refs = git_refs(envelope.cwd)
    for p in bwrap_plan.candidate_paths(envelope, xdg, protected_extra + refs) + (state_root,):
        k = kind_of(p)
        if k is None:
            continue
        kinds[p] = k
        if k == bwrap_plan.SYMLINK:
            real = os.path.realpath(p)
            tk = kind_of(real)
            if tk is not None and tk != bwrap_plan.SYMLINK:
                realpaths[p] = real
                kinds[real] = tk
    resolv_target = None
    if kinds.get("/etc/resolv.conf") == bwrap_plan.SYMLINK:
        resolv_target = os.path.realpath("/etc/resolv.conf")
    return bwrap_plan.BwrapFacts(
        caller_uid=host.uid,
        caller_gid=host.gid,
        kinds=kinds,
        realpaths=realpaths,
        resolv_conf_target=resolv_target,
        xdg_runtime_dir=xdg,
        state_root=state_root,
        git_refs=refs,
    )


def open_seccomp(path: str | None, artifact=None) -> int | None:
    """A read-only descriptor of the seccomp filter for `bwrap --seccomp FD` (SPEC §10).

    With the artifact from `firma.seccomp.store.prepare_filter` (firma run), `open_verified` checks
    sha256, owner, mode and symlinks through the descriptor it returns. A bare path (a runner
    enforcing a contract) is opened without following links and must be a regular file owned by
    us and not writable by others. Anything else refuses the launch: a filter is never dropped."""
    if path is None:
        return None
    if artifact is not None and getattr(artifact, "path", None) == path:
        from ...seccomp import store as seccomp  # noqa: PLC0415 - Linux only

        return seccomp.open_verified(artifact)
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


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f) if k
        )


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _send(pidfd: int | None, sig: int) -> None:
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
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        if self.proc.returncode is None:
            import asyncio  # noqa: PLC0415 - only asyncio callers wait this way; firma run does not

            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.proc_pidfd, lambda: done.done() or done.set_result(None))
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
        _send(self.init_pidfd, signal.SIGKILL)
        if self.proc.poll() is None:
            _send(self.proc_pidfd, signal.SIGKILL)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self.init_pidfd, self.agent_pidfd, self.proc_pidfd):
            if fd is not None:
                os.close(fd)


class Waits:
    """How the launch waits: plain blocking waits. The synchronous launcher passes a subclass
    that also wakes on its signal pipe and raises when a termination signal arrived."""

    def readable(self, fd: int, timeout: float) -> bool:
        return bool(select.select([fd], [], [], max(timeout, 0))[0])

    def pause(self, secs: float) -> None:
        time.sleep(secs)


BLOCKING = Waits()


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


@record(frozen=False)
class HeldSandbox:
    """A sandbox bwrap has built, holding the agent until `BwrapBackend.release`."""

    child: BwrapChild
    plan: bwrap_plan.BwrapPlan
    socks: PlantedSockets
    block_w: int  # the release pipe: one byte execs the agent


def _kill_and_reap(proc: subprocess.Popen, proc_pidfd: int, child: BwrapChild | None) -> None:
    if child is not None:
        child.kill_tree()
        proc.wait()
        child.close()
    else:
        _send(proc_pidfd, signal.SIGKILL)
        proc.wait()
        os.close(proc_pidfd)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def require_command(plan: RunPlan, host: Host) -> None:
    """Refuse before anything starts when the command cannot be found: inside, bwrap would only
    say `execvp` failed and exit 1, which reads like the agent's own status. The sandbox sees the
    host's root read-only, so the host lookup with the launch PATH is the sandbox's lookup, less
    what the sandbox hides (fresh tmpfs dirs, /root when the caller is root, masked home paths)
    unless the workspace or a mount shows it again."""
    hidden = bwrap_plan.hidden_dirs(
        home=plan.home, mask_home_paths=plan.mask_home_paths, caller_is_root=host.is_root,
        xdg_runtime_dir=_xdg_runtime_dir(host), state_root=plan.state_root,
    )
    shown = (plan.cwd,) + tuple(m.target for m in plan.mounts) + tuple(
        os.path.join(plan.home, rel) for rel in plan.writable_home_paths
    )

    def hider(path: str) -> str | None:
        """The hidden directory `path` (or what it links to) is under, None if visible inside."""
        for p in dict.fromkeys((path, os.path.realpath(path))):
            if not any(_within(p, s) for s in shown):
                for h in hidden:
                    if _within(p, h):
                        return h
        return None

    exe = plan.argv[0]
    launch_path = os.pathsep.join(
        e for e in plan.base_env.get("PATH", "").split(os.pathsep) if not (e.startswith("/") and hider(e))
    )
    if "/" in exe:
        path = exe if os.path.isabs(exe) else os.path.join(plan.cwd, exe)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LaunchError(f"command not found or not executable: {exe}; check the path")
    else:
        path = which(exe, launch_path)
        if path is None:
            raise LaunchError(
                f"command not found: {exe} (searched the sandbox PATH {launch_path or '(empty)'}); "
                "install it or give its absolute path"
            )
    h = hider(os.path.abspath(os.path.join(plan.cwd, path)))
    if h is not None:
        raise LaunchError(
            f"command {exe} is under {h}, which the sandbox does not show; "
            "install it elsewhere (e.g. /usr/local/bin) or put it in the workspace"
        )


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
    name = "bwrap"

    def __init__(self, host: Host | None = None) -> None:
        self._host = host
        self._seccomp_artifact = None
        self._protected_extra: tuple[str, ...] = ()  # from the RunPlan (prepare); none for a runner

    def use_seccomp_artifact(self, artifact) -> None:
        """The verified-artifact handle for the envelope's seccomp_filter_path (firma run)."""
        self._seccomp_artifact = artifact

    def prepare(self, plan: RunPlan, host: Host) -> EnforcementProof:
        bwrap_preflight(host)
        require_command(plan, host)
        self._host = host
        self._protected_extra = bwrap_plan.plan_protected(plan)
        self._refuse_protected_symlinks(plan.cwd)  # before any service starts
        return EnforcementProof(
            backend="bwrap",
            structural=True,
            fail_closed=True,
            network_confinement=NetworkConfinement.LINUX_NETWORK_NAMESPACE,
            detail=DETAIL,
        )

    def routing(self) -> RoutingPlan:
        return RoutingPlan(mode=RoutingMode.PLANTED, dns_stub=True)

    def plan_for(
        self, envelope: ExecutionEnvelope, **fds: int | None
    ) -> bwrap_plan.BwrapPlan:
        host = self._host or detect_host()
        facts = measure_facts(envelope, host, self._protected_extra)
        return bwrap_plan.build(
            envelope, facts, bwrap=host.bwrap_path or "bwrap", protected_extra=self._protected_extra, **fds
        )

    def _refuse_protected_symlinks(self, cwd: str) -> None:
        """A protected workspace name that is a symlink is refused, never followed (ATTACKS #36)."""
        extra = self._protected_extra + git_refs(cwd)
        kinds = {p: k for p in bwrap_plan.protected_candidates(cwd, extra) if (k := _kind_of(p))}
        links = bwrap_plan.protection(cwd, extra, kinds).symlinks
        if links:
            raise bwrap_plan.symlink_error(links[0])

    def build(
        self, envelope: ExecutionEnvelope, add_check, log=lambda _m: None, waits: Waits = BLOCKING
    ) -> HeldSandbox:
        """Spawn bwrap holding the agent, read where the sandbox is, check that its network
        namespace has only `lo`, and plant the proxy and DNS sockets in it. On failure nothing
        of the sandbox is left."""
        if self._host is None:
            self._host = detect_host()
        bwrap_preflight(self._host)
        self._refuse_protected_symlinks(envelope.cwd)  # before any descriptor is opened
        seccomp_fd = open_seccomp(envelope.seccomp_filter_path, self._seccomp_artifact)
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
        try:
            # Own process group: a terminal's ^C reaches firma only, which forwards it. Plain
            # Popen + pidfd: no child-watcher thread exists before the planting fork.
            proc = subprocess.Popen(
                bwrap_plan.exec_argv(plan, args_fd), pass_fds=passed, start_new_session=True
            )
            proc_pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            for fd in passed + [info_r, block_w]:
                os.close(fd)
            raise LaunchError(f"cannot start bwrap: {exc.strerror}") from None
        for fd in passed:
            os.close(fd)
        child: BwrapChild | None = None
        try:
            info = _read_info(info_r, _INFO_TIMEOUT, waits)
            init_pid = int(info["child-pid"])
            child = BwrapChild(proc=proc, proc_pidfd=proc_pidfd, init_pid=init_pid, init_pidfd=_pidfd(init_pid))
            log(f"sandbox init pid {init_pid}")

            ifaces = netns_interfaces(init_pid)
            ok = ifaces == ["lo"]
            add_check(Check("netns_only_loopback", ok, "interfaces: " + ",".join(ifaces)))
            if not ok:
                raise LaunchError(f"sandbox network namespace has unexpected interfaces: {ifaces}")
            socks = plant(init_pid)
            add_check(
                Check(
                    "planted_sockets",
                    True,
                    "proxy 127.0.0.1:18080/tcp, dns %s:%d/udp+tcp in the sandbox netns"
                    % PLANTED_DNS_ADDR,
                )
            )
            return HeldSandbox(child=child, plan=plan, socks=socks, block_w=block_w)
        except BaseException:
            os.close(block_w)
            _kill_and_reap(proc, proc_pidfd, child)
            raise
        finally:
            os.close(info_r)

    def release(self, held: HeldSandbox, add_check, waits: Waits = BLOCKING) -> BwrapChild:
        """Measure the built sandbox from outside (resolv.conf, masks, protected paths), release
        the agent, and read its credentials. On failure the sandbox is killed and reaped; the
        planted sockets stay the caller's to close."""
        child = held.child
        try:
            self._verify_resolv_conf(child, add_check, waits)
            self._verify_masks(child, held.plan, add_check)
            self._verify_protected(child, held.plan, add_check)
            os.write(held.block_w, b"1")  # release: bwrap execs the agent
            os.close(held.block_w)
            held.block_w = -1
            self._verify_agent(child, held.plan, add_check, waits)
            return child
        except BaseException:
            self.abort(held)
            raise

    @staticmethod
    def abort(held: HeldSandbox) -> None:
        """Kill and reap a sandbox that will not be released (idempotent)."""
        if held.block_w >= 0:
            os.close(held.block_w)
            held.block_w = -1
        if not held.child.closed:
            _kill_and_reap(held.child.proc, held.child.proc_pidfd, held.child)

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

    def _verify_resolv_conf(self, child: BwrapChild, add_check, waits: Waits) -> None:
        """Before release: /etc/resolv.conf as the sandbox sees it (through its root), must be
        ours. bwrap builds the mount namespace before it blocks, so we wait for that."""
        deadline = time.monotonic() + _CRED_TIMEOUT
        seen = ""
        while True:
            try:
                with open(f"/proc/{child.init_pid}/root/etc/resolv.conf") as f:
                    seen = f.read()
            except OSError as exc:
                seen = f"unreadable: {exc.strerror}"
            if seen == bwrap_plan.RESOLV_CONF or time.monotonic() > deadline or child.proc.poll() is not None:
                break
            waits.pause(0.0002)
        ok = seen == bwrap_plan.RESOLV_CONF
        add_check(Check("resolv_conf_points_at_stub", ok, " ".join(seen.split())[:200]))
        if not ok and child.proc.poll() is not None:
            # bwrap gave up while building the mount namespace (e.g. a mount target it cannot
            # create); its own one-line reason is already on stderr.
            raise LaunchError(
                "bwrap could not build the sandbox (its reason is printed above); "
                "fix the mount or path it names, then rerun"
            )
        if not ok:
            raise LaunchError("sandbox /etc/resolv.conf does not point at the planted DNS stub; refusing to start the agent")

    def _verify_masks(self, child: BwrapChild, plan: bwrap_plan.BwrapPlan, add_check) -> None:
        """Before release: every masked path is a mount point in the sandbox's final mount table
        (read from outside), so no later mount hid a mask and none was skipped."""
        try:
            with open(f"/proc/{child.init_pid}/mountinfo") as f:
                points = {_unescape(line.split()[4]) for line in f if line.strip()}
        except OSError as exc:
            raise LaunchError(f"cannot read the sandbox mount table: {exc.strerror}") from None
        missing = [p for p in plan.masked if p not in points]
        add_check(
            Check(
                "masked_paths",
                not missing,
                ("mounted over: " + ", ".join(plan.masked))
                + (f"; NOT masked: {', '.join(missing)}" if missing else ""),
            )
        )
        if missing:
            raise LaunchError(f"sandbox paths not masked as planned: {', '.join(missing)}; refusing to start the agent")

    def _verify_protected(self, child: BwrapChild, plan: bwrap_plan.BwrapPlan, add_check) -> None:
        """Before release: each protected path is, in the final mount table, a read-only mount
        point at exactly that path (a bind through a link swapped in meanwhile would land
        elsewhere), and each pinned parent is a mount point (so it cannot be renamed away)."""
        prot = plan.protection
        top: dict[str, list[str]] = {}
        try:
            with open(f"/proc/{child.init_pid}/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 5:
                        top[_unescape(fields[4])] = fields[5].split(",")  # the last one wins
        except OSError as exc:
            raise LaunchError(f"cannot read the sandbox mount table: {exc.strerror}") from None
        # A home mask inside the workspace (cwd = $HOME) is mounted later and hides even more.
        hidden = [m for m in plan.masked if not _within(prot.workspace, m)]

        def masked(p: str) -> bool:
            return any(_within(p, m) for m in hidden)

        bad = [p for p in prot.read_only if "ro" not in top.get(p, ()) and not masked(p)]
        bad += [p for p in prot.pinned if p not in top and not masked(p)]
        detail = "read-only: " + (", ".join(prot.read_only) or "(none present)")
        if prot.absent:
            detail += "; absent, not protected: " + ", ".join(prot.absent)
        if bad:
            detail += "; NOT protected: " + ", ".join(bad)
        add_check(Check("workspace_protected_paths", not bad, detail))
        if bad:
            raise LaunchError(
                f"protected workspace paths not mounted read-only as planned: {', '.join(bad)}; "
                "refusing to start the agent"
            )

    def _verify_agent(
        self, child: BwrapChild, plan: bwrap_plan.BwrapPlan, add_check, waits: Waits
    ) -> None:
        """Read the agent's credentials from outside; refuse if not confined."""
        deadline = time.monotonic() + _CRED_TIMEOUT
        subject = None
        status: dict[str, str] | None = None
        while time.monotonic() < deadline:
            kids = _children(child.init_pid)
            if kids:
                pid = kids[0]
                pidfd = _pidfd(pid)  # pins the pid before reading, so the reading is of it
                try:
                    st = _status(pid)
                    pgid = os.getpgid(pid)
                except OSError:  # exited meanwhile
                    if pidfd is not None:
                        os.close(pidfd)
                else:
                    status, subject = st, "agent"
                    child.agent_pid, child.agent_pidfd, child.agent_pgid = pid, pidfd, pgid
                    break
            if child.proc.poll() is not None or not os.path.exists(f"/proc/{child.init_pid}"):
                break
            waits.pause(0.0002)
        if status is None:
            # The agent already finished: bwrap's init dropped privileges before forking it and
            # NoNewPrivs is irreversible, so init's credentials bound the agent's.
            try:
                st = _status(child.init_pid)
                if st.get("CapEff") == "0000000000000000":
                    status, subject = st, "sandbox init (agent already exited)"
            except OSError:
                pass
        if status is None:
            add_check(Check("agent_no_capabilities", False, "agent exited before its credentials could be read"))
            return
        capeff = status.get("CapEff", "?")
        nnp = status.get("NoNewPrivs", "?")
        cap_ok = capeff == "0000000000000000"
        nnp_ok = nnp == "1"
        add_check(Check("agent_no_capabilities", cap_ok, f"{subject} CapEff={capeff}"))
        add_check(Check("agent_no_new_privs", nnp_ok, f"{subject} NoNewPrivs={nnp}"))
        add_check(
            Check("agent_uid", True, f"inside uid {plan.inside_uid} gid {plan.inside_gid}")
        )
        if not (cap_ok and nnp_ok):
            raise LaunchError(
                f"sandboxed agent holds privileges (CapEff={capeff}, NoNewPrivs={nnp}); refusing to continue"
            )

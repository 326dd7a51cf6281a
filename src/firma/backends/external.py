"""Starting an external enforcer: the launch contract file and the process group around it.

Shared by the vz guest mode and the `runner` backend (`launch_contract`), and by the vz
sandbox-exec modes (`spawn_group`). The contract is written privately — its directory 0700, the
file created with O_EXCL|O_NOFOLLOW at mode 0600 relative to a directory fd opened without
following links, written, then fsynced — before the runner starts, and removed when the runner
has exited or the run is torn down. The runner is started as exactly
`<runner> --launch-contract <absolute path>` in its own session (so its own process group, and no
controlling terminal to inject into), stdio inherited, with the contract's `command.env` as its
environment: it never sees firma's own environment or any secret."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
from typing import Any, Callable, Mapping, Sequence

from ..core.contract import contract_json
from ..core.model import Check
from ..errors import ContractError, LaunchError
from .base import LaunchHooks

CONTRACT_FLAG = "--launch-contract"


# --- the private contract file ---------------------------------------------------------------


def _ensure_private_dir(path: str) -> None:
    """Create `path` (and missing parents) 0700, or accept it only if it already is a private
    directory of ours that is not a symlink: the contract carries the launch environment."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        _ensure_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # the umask may have removed owner bits; it never adds any
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise ContractError(
            f"cannot create the launch contract directory {path}: {exc.strerror or exc}"
        ) from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ContractError(
            f"launch contract directory {path} is not a plain directory (a symlink or a file); "
            "remove it"
        )
    if st.st_uid != os.geteuid():
        raise ContractError(
            f"launch contract directory {path} is owned by uid {st.st_uid}, not by us; remove it"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ContractError(
            f"launch contract directory {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must "
            "be 0700 (chmod 700 it or remove it)"
        )


def write_private(path: str, text: str) -> os.stat_result:
    """Write `text` to the new file `path` (mode 0600, parent dir 0700); return the file's stat.

    Refuses an existing file (O_EXCL) or a symlink at the final component (O_NOFOLLOW); the
    directory is opened with O_NOFOLLOW too, so a link swapped in for it is refused."""
    if not os.path.isabs(path):
        raise ContractError(f"launch contract path must be absolute: {path}")
    directory, name = os.path.split(path)
    _ensure_private_dir(directory)
    data = text.encode("utf-8")
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ContractError(
            f"cannot open the launch contract directory {directory}: {exc.strerror or exc}"
        ) from None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
        except FileExistsError:
            raise ContractError(
                f"launch contract {path} already exists; a stale run left it behind: remove it"
            ) from None
        except OSError as exc:
            raise ContractError(
                f"cannot create launch contract {path}: {exc.strerror or exc}"
            ) from None
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            _unlink_quiet(name, dfd)
            raise ContractError(f"cannot write launch contract {path}: {exc.strerror or exc}") from None
        os.close(fd)
        try:
            os.fsync(dfd)  # the name is durable before a runner is told to open it
        except OSError:
            pass
        return st
    finally:
        os.close(dfd)


def _unlink_quiet(name: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def remove_contract(path: str) -> None:
    """Idempotent: the file is gone afterwards (or was never written)."""
    _unlink_quiet(path)


# --- a child in its own process group --------------------------------------------------------


class GroupChild:
    """A `LaunchedChild`: the leader of its own session/process group.

    `wait` returns the exit code, or 128+N for death by signal N. `forward_signal` and
    `kill_tree` address the whole group, so the runner's (or sandbox-exec's) children are
    reached too. `on_exit` callbacks run once, when the leader has been reaped or the tree
    killed (the contract is removed there)."""

    def __init__(self, proc: asyncio.subprocess.Process, on_exit: Sequence[Callable[[], None]] = ()):
        self._proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        self._on_exit = list(on_exit)
        self._exit_status: int | None = None

    @property
    def exit_status(self) -> int | None:
        return self._exit_status

    def _run_on_exit(self) -> None:
        callbacks, self._on_exit = self._on_exit, []
        for cb in callbacks:
            cb()

    async def wait(self) -> int:
        try:
            rc = await self._proc.wait()
        finally:
            if self._proc.returncode is not None:
                self._run_on_exit()
        self._exit_status = 128 - rc if rc < 0 else rc
        return self._exit_status

    def forward_signal(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone (its number may even belong to someone else now)

    def kill_tree(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._run_on_exit()

    async def reap(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Nothing to release: the leader is reaped by `wait`."""


async def spawn_group(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    on_exit: Sequence[Callable[[], None]] = (),
) -> GroupChild:
    """Start `argv` with exactly `env`, stdio inherited, as the leader of a new session."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        for cb in on_exit:
            cb()
        raise LaunchError(
            f"could not start {argv[0]} (working directory {cwd}): {exc.strerror or exc}"
        ) from None
    return GroupChild(proc, on_exit)


# --- the launch contract path (vz guest, runner backend) --------------------------------------


def runner_argv(runner_path: str, contract_path: str) -> list[str]:
    """Exactly two arguments after the runner: the flag and the absolute contract path."""
    return [runner_path, CONTRACT_FLAG, contract_path]


async def launch_contract(
    *,
    backend: str,
    runner_path: str,
    contract: Mapping[str, Any],
    contract_path: str,
    hooks: LaunchHooks,
) -> GroupChild:
    """Write `contract` privately to `contract_path`, then start the runner on it."""
    contract_path = os.path.abspath(contract_path)
    text = contract_json(contract)
    st = write_private(contract_path, text)
    dir_mode = stat.S_IMODE(os.lstat(os.path.dirname(contract_path)).st_mode)
    file_mode = stat.S_IMODE(st.st_mode)
    ok = file_mode == 0o600 and dir_mode == 0o700 and st.st_uid == os.geteuid()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    hooks.add_check(
        Check(
            name="launch_contract_private",
            ok=ok,
            detail=(
                f"{contract_path} mode {file_mode:04o} in directory mode {dir_mode:04o}, "
                f"sha256 {digest}"
            ),
        )
    )
    if not ok:
        remove_contract(contract_path)
        raise ContractError(
            f"launch contract {contract_path} is not private (file {file_mode:04o}, directory "
            f"{dir_mode:04o}); refusing to start the runner"
        )
    hooks.log(f"{backend}: launch contract written to {contract_path}")
    command = contract["command"]
    return await spawn_group(
        runner_argv(runner_path, contract_path),
        env=command["env"],
        cwd=command["cwd"],
        on_exit=(lambda: remove_contract(contract_path),),
    )


__all__ = [
    "CONTRACT_FLAG",
    "GroupChild",
    "launch_contract",
    "remove_contract",
    "runner_argv",
    "spawn_group",
    "write_private",
]

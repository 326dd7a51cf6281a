"""Starting an external enforcer: the launch contract file and the process group around it.

Shared by the vz guest mode and the `runner` backend (`launch_contract`), and by the vz
sandbox-exec modes (`spawn_group`). The contract is written privately — its directory 0700, the
file created with O_EXCL|O_NOFOLLOW at mode 0600 relative to a directory fd opened without
following links, written, then fsynced — before the runner starts, and removed when the runner
has exited or the run is torn down. The runner is started as exactly
`<runner> --launch-contract <absolute path>` in its own session (so its own process group, and no
controlling terminal to inject into), stdio inherited, in `/`, with an environment of firma's own
(`runner_env`: system PATH, HOME, LANG, TERM) — never `command.env`, which is the agent's and
could carry PYTHONPATH or LD_PRELOAD into a trusted host process. Every process started here dies
with the launcher (parent-death signal), so no runner or agent outlives a SIGKILLed firma."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
from typing import Any, Callable, Mapping, Sequence

from .. import privfs
from ..core.contract import contract_json
from ..core.contract_validate import MAX_CONTRACT_BYTES
from ..core.model import Check
from ..errors import ContractError, LaunchError
from ..privfs import PrivatePathError
from .base import LaunchHooks

CONTRACT_FLAG = "--launch-contract"


# --- the private contract file ---------------------------------------------------------------


def write_private(path: str, text: str) -> os.stat_result:
    """Write `text` to the new file `path` (0600, in a private 0700 directory: firma.privfs's
    `ensure_dir` and `create_new`); return the file's stat. An existing file or a symlink is
    refused, never followed."""
    if not os.path.isabs(path):
        raise ContractError(f"launch contract path must be absolute: {path}")
    try:
        privfs.ensure_dir(os.path.dirname(path))
        privfs.create_new(path, text)
        return os.lstat(path)
    except FileExistsError:
        raise ContractError(f"launch contract {path} already exists; a stale run left it behind: remove it") from None
    except PrivatePathError as exc:
        raise ContractError(f"launch contract: {exc}") from None
    except OSError as exc:
        raise ContractError(f"cannot create launch contract {path}: {exc.strerror or exc}") from None


def read_contract_file(path: str) -> tuple[bytes, int]:
    """(bytes, st_mode) of one open launch contract (firma.privfs `read_private`: no final
    symlink, owned by the caller or root, ancestors private); its mode is reported by the
    validator with the other problems."""
    try:
        return privfs.read_private(path, MAX_CONTRACT_BYTES, what="launch contract", mode_checked_by_caller=True)
    except FileNotFoundError:
        raise ContractError(f"cannot open launch contract {path}: no such file") from None
    except PrivatePathError as exc:
        raise ContractError(str(exc)) from None


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
        self.limit_notes: tuple[str, ...] = ()  # launch contract v1 carries no limits
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


# The runner's own environment: nothing of the agent's (or the caller's) beyond these.
RUNNER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_PDEATHSIG = 1


def runner_env(agent_env: Mapping[str, str], home: str) -> dict[str, str]:
    """A trusted host process's environment: system PATH, the caller's HOME, LANG and TERM —
    and, for a runner written in Python (the reference runner is), what `python3 -I` would do
    that a console script's `#!` line cannot ask for: no user site-packages, no script directory
    or current directory on sys.path."""
    env = {"PATH": RUNNER_PATH, "HOME": home, "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1"}
    for key in ("LANG", "TERM"):
        if agent_env.get(key):
            env[key] = agent_env[key]
    return env


def _die_with_launcher() -> Callable[[], None]:
    """A preexec step: SIGKILL when the launcher dies, and exit at once if it already has (the
    signal is only armed for a parent that is still there). Resolved before the fork."""
    import ctypes  # noqa: PLC0415 - only when an external enforcer starts

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


async def spawn_group(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    on_exit: Sequence[Callable[[], None]] = (),
) -> GroupChild:
    """Start `argv` with exactly `env`, stdio inherited, as the leader of a new session that dies
    with the launcher."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_die_with_launcher(),
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
        env=runner_env(command["env"], command["env"].get("HOME") or "/"),
        cwd="/",
        on_exit=(lambda: remove_contract(contract_path),),
    )


__all__ = [
    "CONTRACT_FLAG",
    "GroupChild",
    "launch_contract",
    "read_contract_file",
    "remove_contract",
    "runner_argv",
    "spawn_group",
    "write_private",
]

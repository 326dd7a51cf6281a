"""The rlimits of the held sandbox's init, which the agent inherits (DESIGN §5.3): set with
prlimit before the release and read back. Never raised above what the caller has (only lowered),
so a root caller's agent gets nothing a user's would not."""

from __future__ import annotations

import os
import resource
import signal

from ...errors import LaunchError

RESOURCES = {
    "NPROC": resource.RLIMIT_NPROC,
    "NOFILE": resource.RLIMIT_NOFILE,
    "FSIZE": resource.RLIMIT_FSIZE,
    "DATA": resource.RLIMIT_DATA,
}


def _lowered(name: str, value: int, current: tuple[int, int]) -> tuple[int, int]:
    soft, hard = current
    new_hard = value if hard == resource.RLIM_INFINITY else min(value, hard)
    # open files: a soft limit below the hard one stays (select()-based programs rely on 1024)
    new_soft = min(soft, new_hard) if name == "NOFILE" and soft != resource.RLIM_INFINITY else new_hard
    return new_soft, new_hard


def _apply(pid: int, rlimits: tuple[tuple[str, int], ...]) -> list[tuple[str, int, int]]:
    out = []
    for name, value in rlimits:
        res = RESOURCES[name]
        want = _lowered(name, value, resource.prlimit(pid, res))
        resource.prlimit(pid, res, want)
        got = resource.prlimit(pid, res)
        if got != want:
            raise OSError(0, f"RLIMIT_{name} reads {got}, not {want}")
        out.append((name, got[0], got[1]))
    return out


def apply(pid: int, rlimits: tuple[tuple[str, int], ...], as_ids: tuple[int, int] | None) -> dict[str, tuple[int, int]]:
    """Set `rlimits` on `pid`; (soft, hard) as read back, by name. `as_ids`: the (uid, gid) to do
    it as, from a short-lived child (a root caller's sandbox runs as the agent uid, and the
    kernel lets a process of the same uid set its limits)."""
    if not rlimits:
        return {}
    if as_ids is not None:
        try:  # a root caller with CAP_SYS_RESOURCE needs no helper
            return {n: (s, h) for n, s, h in _apply(pid, rlimits)}
        except PermissionError:
            pass
    if as_ids is None:
        try:
            got = _apply(pid, rlimits)
        except OSError as exc:
            raise LaunchError(f"cannot set the sandbox's rlimits: {exc.strerror}; refusing to start the agent") from None
        return {n: (s, h) for n, s, h in got}
    uid, gid = as_ids
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - child: never returns into the launcher
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                text = " ".join(f"{n}={s},{h}" for n, s, h in _apply(pid, rlimits))
            except OSError as exc:
                text = "!" + (exc.strerror or str(exc))
            os.write(w, text.encode())
        except BaseException:  # noqa: BLE001 - reported as a failure by the empty pipe
            pass
        finally:
            try:
                os._exit(0)
            finally:  # whatever happens, this fork never runs the launcher's code
                os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    # The helper's exit, not the pipe's end, says it is done: a process the launcher's main thread
    # forks meanwhile may hold a copy of the write end. Its answer (< PIPE_BUF) is in the pipe.
    data = b""
    try:
        os.waitpid(child, 0)
        os.set_blocking(r, False)
        while chunk := os.read(r, 4096):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(r)
    text = data.decode(errors="replace")
    if not text or text.startswith("!"):
        raise LaunchError(f"cannot set the sandbox's rlimits: {text[1:] or 'the helper failed'}; refusing to start the agent")
    out: dict[str, tuple[int, int]] = {}
    for item in text.split():
        name, _, pair = item.partition("=")
        soft, hard = pair.split(",")
        out[name] = (int(soft), int(hard))
    return out

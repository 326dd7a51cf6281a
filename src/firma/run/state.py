"""The state root and per-run directories (SPEC §12): private (0700) and never inside a sandbox.

`<root>/run/<sandbox_id>/` holds run.log, sidecar.log, contracts and generated /etc files and is
removed at teardown; `<root>/proofs/`, `<root>/audit.jsonl` and `<root>/audit.key` are kept."""

from __future__ import annotations

import errno
import os
import stat

from ..core.record import record
from ..errors import PlanError


@record
class RunDirs:
    root: str
    run_dir: str
    proofs_dir: str

    @property
    def audit_path(self) -> str:
        return os.path.join(self.root, "audit.jsonl")

    @property
    def key_path(self) -> str:
        return os.path.join(self.root, "audit.key")

    @property
    def run_log(self) -> str:
        return os.path.join(self.run_dir, "run.log")

    def proof_path(self, sandbox_id: str) -> str:
        return os.path.join(self.proofs_dir, f"{sandbox_id}.json")


def ensure_private_dir(path: str) -> None:
    """Create `path` (and parents) 0700; refuse an existing one we do not own or others can use."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise PlanError(f"cannot create state directory {path}: {exc.strerror}; set FIRMA_STATE_DIR") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PlanError(f"state directory {path} is not a directory; remove it or set FIRMA_STATE_DIR")
    if st.st_uid != os.getuid():
        raise PlanError(
            f"state directory {path} is owned by uid {st.st_uid}, not you; remove it or set FIRMA_STATE_DIR"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


OWNER = "owner"  # "<launcher pid> <its start time in clock ticks>"
_UNOWNED_GRACE_SECS = 600.0


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name may contain spaces/parens: fields after the last ')'
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record(pid: int) -> str:
    return f"{pid} {_start_time(pid) or '?'}\n"


def _owner_alive(text: str) -> bool:
    try:
        pid_s, start = text.split()
        pid = int(pid_s)
    except ValueError:
        return False
    return _start_time(pid) == start


def sweep_stale(root: str, now: float) -> list[str]:
    """Remove run dirs left by launchers that died without teardown (ATTACKS #54): never reused,
    never left to pile up. A dir without an owner file is only removed after a grace period
    (a concurrent launch may be between mkdir and writing it)."""
    removed = []
    base = os.path.join(root, "run")
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        d = os.path.join(base, name)
        try:
            with open(os.path.join(d, OWNER)) as f:
                stale = not _owner_alive(f.read())
        except FileNotFoundError:
            try:
                stale = now - os.lstat(d).st_mtime > _UNOWNED_GRACE_SECS
            except OSError:
                continue
        except OSError:
            continue
        if stale:
            remove_tree(d)
            removed.append(name)
    return removed


def create(root: str, sandbox_id: str) -> RunDirs:
    ensure_private_dir(root)
    ensure_private_dir(os.path.join(root, "run"))
    proofs = os.path.join(root, "proofs")
    ensure_private_dir(proofs)
    run_dir = os.path.join(root, "run", sandbox_id)
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        raise PlanError(f"run directory {run_dir} already exists; sandbox ids must be unique") from None
    write_private(os.path.join(run_dir, OWNER), owner_record(os.getpid()))
    return RunDirs(root=root, run_dir=run_dir, proofs_dir=proofs)


def remove_tree(path: str) -> None:
    """Remove a run directory. Run directories hold only files, which are unlinked through a
    descriptor of the directory (no path re-resolution, symlinks removed, never followed);
    anything else there falls back to shutil.rmtree (imported only then: ~3 ms of a launch)."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    nested = False
    try:
        for entry in os.scandir(dfd):
            try:
                if entry.is_dir(follow_symlinks=False):
                    nested = True
                else:
                    os.unlink(entry.name, dir_fd=dfd)
            except OSError:
                nested = True
    finally:
        os.close(dfd)
    try:
        os.rmdir(path)
    except OSError:
        nested = True
    if nested:
        import shutil  # noqa: PLC0415 - rare

        shutil.rmtree(path, ignore_errors=True)


def private_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new 0600 file with a random name in `directory`, opened read-write: (fd, path).
    Like tempfile.mkstemp, whose import (random, hashlib seeding) costs a launch ~2 ms."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)


def write_private(path: str, data: str) -> None:
    """Atomic (temp + rename) write of a 0600 file."""
    d = os.path.dirname(path) or "."
    fd, tmp = private_temp(d, ".tmp-", ".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_run_dir(dirs: RunDirs, *, keep_log_as: str | None) -> None:
    """Remove the per-run dir; first copy run.log next to the proof when the run failed."""
    if keep_log_as and os.path.exists(dirs.run_log):
        import shutil  # noqa: PLC0415 - failed runs only

        try:
            shutil.copyfile(dirs.run_log, keep_log_as)
            os.chmod(keep_log_as, 0o600)
        except OSError:
            pass
    remove_tree(dirs.run_dir)

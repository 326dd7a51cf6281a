"""The state layout (DESIGN §12), owned here: every name under the state root and the per-run
directories, all private (firma.privfs) and never inside a sandbox.

`<root>/run/<sandbox_id>/` holds the owner record, run.log, sidecar.sock, contracts and generated
/etc files and is removed at teardown; `<root>/proofs/`, `<root>/audit.jsonl` and
`<root>/audit.key` are kept."""

from __future__ import annotations

import os

from .. import privfs
from ..core.record import record
from ..core.statelayout import (
    OWNER,
    PROOFS,
    RUN_LOG,
    RUNS,
    SIDECAR_SOCKET,
    audit_key_path,
    audit_log_path,
    run_dir_path,
)
from ..errors import PlanError
from ..privfs import PrivatePathError


@record
class RunDirs:
    root: str
    run_dir: str
    proofs_dir: str

    @property
    def audit_path(self) -> str:
        return audit_log_path(self.root)

    @property
    def key_path(self) -> str:
        return audit_key_path(self.root)

    @property
    def run_log(self) -> str:
        return os.path.join(self.run_dir, RUN_LOG)

    @property
    def sidecar_socket(self) -> str:
        return os.path.join(self.run_dir, SIDECAR_SOCKET)

    def proof_path(self, sandbox_id: str) -> str:
        return os.path.join(self.proofs_dir, f"{sandbox_id}.json")


def ensure_private_dir(path: str) -> None:
    """A directory of the state layout, by the private-path rule (firma.privfs.ensure_dir); a
    refusal names the fix for the state root."""
    try:
        privfs.ensure_dir(path)
    except PrivatePathError as exc:
        raise PlanError(f"state directory: {exc}; or set FIRMA_STATE_DIR to a private directory") from None


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
    removed: list[str] = []
    base = os.path.join(root, RUNS)
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
            privfs.remove_tree(d)
            removed.append(name)
    return removed


def create(root: str, sandbox_id: str) -> RunDirs:
    ensure_private_dir(root)
    ensure_private_dir(os.path.join(root, RUNS))
    proofs = os.path.join(root, PROOFS)
    ensure_private_dir(proofs)
    run_dir = run_dir_path(root, sandbox_id)
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        raise PlanError(f"run directory {run_dir} already exists; sandbox ids must be unique") from None
    privfs.create_new(os.path.join(run_dir, OWNER), owner_record(os.getpid()))
    return RunDirs(root=root, run_dir=run_dir, proofs_dir=proofs)


def remove_run_dir(dirs: RunDirs, *, keep_log_as: str | None) -> None:
    """Remove the per-run dir; first copy run.log next to the proof when the run failed."""
    if keep_log_as and os.path.exists(dirs.run_log):
        import shutil  # noqa: PLC0415 - failed runs only

        try:
            shutil.copyfile(dirs.run_log, keep_log_as)
            os.chmod(keep_log_as, 0o600)
        except OSError:
            pass
    privfs.remove_tree(dirs.run_dir)


def prune_proofs(proofs_dir: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` proofs (by modification time), each with the run log kept
    beside it; returns the removed sandbox ids. Only names firma writes are touched."""
    try:
        entries = [e for e in os.scandir(proofs_dir) if e.name.startswith("sbx_") and e.name.endswith(".json")]
    except OSError:
        return []
    if len(entries) <= keep:
        return []
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
    removed = []
    for e in entries[keep:]:
        sid = e.name[: -len(".json")]
        for name in (e.name, f"{sid}.run.log"):
            try:
                os.unlink(os.path.join(proofs_dir, name))
            except FileNotFoundError:
                pass
        removed.append(sid)
    return removed

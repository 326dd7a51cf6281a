"""The run summary from the run's own audit events (DESIGN §4): read what the shared audit log
gained since this run opened, keep this sandbox's lines, count (firma.core.runsummary)."""

from __future__ import annotations

import json
import os

from ..core import runsummary
from ..core.statelayout import audit_log_path

# A run that wrote more than this much audit is summarised from its first part, and says so.
MAX_SUMMARY_AUDIT_BYTES = 64 << 20


def audit_size(state_root: str) -> int:
    """Where this run's audit lines can start: the log's size when the run opens."""
    try:
        return os.stat(audit_log_path(state_root)).st_size
    except OSError:
        return 0


def _events(state_root: str, offset: int):
    path = audit_log_path(state_root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return [], False
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:  # rotated or truncated meanwhile: read what is there
            offset = 0
        f.seek(offset)
        data = f.read(MAX_SUMMARY_AUDIT_BYTES + 1)
    truncated = len(data) > MAX_SUMMARY_AUDIT_BYTES
    out = []
    for line in data[:MAX_SUMMARY_AUDIT_BYTES].splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out, truncated


def collect(state_root: str, offset: int, *, sandbox_id: str, exit_status: int | None, proof_path: str | None,
            monitor: bool, notes: tuple[str, ...] = ()) -> runsummary.RunSummary:
    events, truncated = _events(state_root, offset)
    if truncated:
        notes = notes + (f"the audit grew by more than {MAX_SUMMARY_AUDIT_BYTES >> 20} MiB; counts cover its first part",)
    return runsummary.summarize(events, sandbox_id=sandbox_id, exit_status=exit_status, proof_path=proof_path,
                                monitor=monitor, notes=notes)

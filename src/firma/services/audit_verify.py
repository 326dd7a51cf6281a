"""Reads the audit log, its rotated files and their checkpoint files for `firma audit verify`
(the verdicts are core.auditverify's): the files are opened and their sizes noted under a shared
lock, so a concurrent writer's half-done append is never seen; reading happens after it."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

from ..core import auditfmt
from ..core.auditchain import CHAIN_SUFFIX
from ..core.auditverify import Verdict, series_verdict, verify_file
from ..errors import AuditError
from .audit_chainfile import rotated_path, snapshot_lock

_BLOCK = 1 << 20


def _rotated_numbers(path: str) -> list[int]:
    """The N of every `<log>.N` and `<log>.N.chain` beside the log."""
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.([1-9][0-9]*)(?:" + re.escape(CHAIN_SUFFIX) + ")?$")
    try:
        names = os.listdir(directory or ".")
    except OSError as exc:
        raise AuditError(f"cannot list {directory}: {exc.strerror}") from None
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))}, reverse=True)


def _open(path: str) -> tuple[int, int] | None:
    """(fd, size) or None when absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror}") from None
    return fd, os.fstat(fd).st_size


def _lines(fd: int, size: int) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, ended by a newline) for the first `size` bytes."""
    offset, pending = 0, b""
    while offset < size:
        block = os.pread(fd, min(_BLOCK, size - offset), offset)
        if not block:
            break
        offset += len(block)
        parts = (pending + block).split(b"\n")
        pending = parts.pop()
        for p in parts:
            yield p, True
    if pending:
        yield pending, False


def verify_series(path: str, public_key) -> Verdict:
    """The log at `path` with its rotated predecessors (`path.N`, oldest first) and checkpoints."""
    if not os.path.lexists(path) and not _rotated_numbers(path):
        raise AuditError(f"cannot read audit log {path}: no such file; pass the log's path (or set FIRMA_STATE_DIR)")
    opened: list[tuple[str, tuple[int, int] | None, bytes | None]] = []
    lock = snapshot_lock(path)
    try:
        for n in _rotated_numbers(path) + [0]:
            name = rotated_path(path, n)
            log = _open(name)
            chain = _open(name + CHAIN_SUFFIX)
            chain_bytes = None
            if chain is not None:
                try:
                    chain_bytes = os.pread(chain[0], chain[1], 0)
                finally:
                    os.close(chain[0])
            opened.append((name, log, chain_bytes))
    finally:
        if lock is not None:
            os.close(lock)  # releases the shared lock
    results, missing = [], []
    try:
        for name, log, chain_bytes in opened:
            shown = os.path.basename(name)
            if log is None:
                if chain_bytes is not None:
                    missing.append(shown)
                continue
            results.append(verify_file(shown, chain_bytes, _lines(*log), public_key))
    finally:
        for _name, log, _c in opened:
            if log is not None:
                with contextlib.suppress(OSError):
                    os.close(log[0])
    return series_verdict(results, tuple(missing))


def verify_signatures(path: str, public_key) -> tuple[int, list[tuple[int, str]]]:
    """Every line's signature only (`--no-chain`: a log from before the chain or another
    implementation); blank lines are skipped."""
    bad: list[tuple[int, str]] = []
    n = 0
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                ok, why = auditfmt.verify_line(line, public_key)
                if not ok:
                    bad.append((lineno, why))
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    return n, bad

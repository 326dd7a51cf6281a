"""The chained audit log on disk (DESIGN §9 "Chain"): appends a batch of signed lines and its
signed checkpoint record under an exclusive `flock` on `<log>.lock`, so any number of processes
sharing a state root extend one chain; seals what a crashed writer left; rotates by size.

Synchronous and blocking: it runs on the audit writer's own thread."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from ..core.auditcaps import AuditCaps
from ..core.auditchain import (
    CHAIN_SUFFIX,
    GAP_CRASH,
    GAP_UNCHAINED,
    GENESIS,
    LOCK_SUFFIX,
    Tip,
    chain_batch,
    checkpoint_line,
    tip_after,
)
from ..errors import AuditError
from .audit_files import open_audit_log

_SEAL_LINES = 4096  # lines per record when sealing what another writer left


def rotated_path(path: str, n: int) -> str:
    return path if n == 0 else f"{path}.{n}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def last_record(fd: int) -> tuple[bytes | None, int]:
    """(the last complete line of the file, the offset just past it); (None, 0) when there is none."""
    pos = os.fstat(fd).st_size
    buf = b""
    while True:
        end = buf.rfind(b"\n")
        if end >= 0:
            start = buf.rfind(b"\n", 0, end)
            if start >= 0 or pos == 0:
                return buf[start + 1 : end], pos + end + 1
        if pos == 0:
            return None, 0
        n = min(1 << 16, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextlib.contextmanager
def _reading(path: str, fd: int) -> Iterator[int]:
    """A read-only descriptor of the file `fd` appends to (append descriptors cannot read)."""
    rfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _same_file(path, fd) or os.fstat(rfd).st_ino != os.fstat(fd).st_ino:
            raise AuditError(f"audit file {path} was replaced while in use; run `firma audit verify`")
        yield rfd
    finally:
        os.close(rfd)


class ChainedLog:
    def __init__(self, path: str, caps: AuditCaps, remedy: str = "fix --audit or its directory") -> None:
        if caps.keep_rotated < 1:
            raise ValueError("AuditCaps.keep_rotated must be at least 1")
        self.path = path
        self._caps = caps
        self._remedy = remedy
        self._lock_fd = open_audit_log(path + LOCK_SUFFIX, remedy)
        self._log_fd = -1
        self._chain_fd = -1
        self._tip: Tip | None = None
        self._chain_seen = -1  # the checkpoint file's size when _tip was last read or written
        try:
            with self._locked():
                self._finish_rotation()
                self._open()
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        self._close_files()
        self._log_fd = open_audit_log(self.path, self._remedy)
        self._chain_fd = open_audit_log(self.path + CHAIN_SUFFIX, self._remedy)
        self._tip = None

    def _finish_rotation(self) -> None:
        """A writer that died between renaming the log and its checkpoint file left the current
        checkpoint file without its log: move it beside the log it describes."""
        chain = self.path + CHAIN_SUFFIX
        first = rotated_path(self.path, 1)
        if not os.path.lexists(self.path) and os.path.lexists(chain) and os.path.lexists(first) \
                and not os.path.lexists(first + CHAIN_SUFFIX):
            os.rename(chain, first + CHAIN_SUFFIX)

    def _close_files(self) -> None:
        for fd in (self._log_fd, self._chain_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._log_fd = self._chain_fd = -1

    def close(self) -> None:
        self._close_files()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1

    def fsync(self) -> None:
        for fd in (self._log_fd, self._chain_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(fd)

    # -- the tip ------------------------------------------------------------------------------
    def _read_tip(self) -> Tip:
        """The chain's end as the checkpoint files say (a partial final record, a crashed
        writer's, is cut off first)."""
        with _reading(self.path + CHAIN_SUFFIX, self._chain_fd) as rfd:
            rec, end = last_record(rfd)
        if end < os.fstat(self._chain_fd).st_size:
            os.ftruncate(self._chain_fd, end)
        if rec is not None:
            return self._tip_of(rec, self.path + CHAIN_SUFFIX)
        prev_chain = rotated_path(self.path, 1) + CHAIN_SUFFIX
        try:
            fd = os.open(prev_chain, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return Tip(keep=self._caps.keep_rotated)
        except OSError as exc:
            raise AuditError(f"cannot read audit checkpoints {prev_chain}: {exc.strerror}; {self._remedy}") from None
        try:
            rec, _end = last_record(fd)
        finally:
            os.close(fd)
        if rec is None:
            return Tip(keep=self._caps.keep_rotated)
        t = self._tip_of(rec, prev_chain)
        return Tip(gen=t.gen + 1, seq=0, lines=0, size=0, chain=t.chain, keep=self._caps.keep_rotated)

    def _tip_of(self, rec: bytes, where: str) -> Tip:
        try:
            t = tip_after(rec)
        except ValueError as exc:
            raise AuditError(f"audit checkpoint file {where} is damaged ({exc}); run `firma audit verify` "
                             "and move the log and its checkpoint files aside") from None
        return Tip(gen=t.gen, seq=t.seq, lines=t.lines, size=t.size, chain=t.chain, keep=self._caps.keep_rotated)

    def _current_tip(self) -> Tip:
        if not (_same_file(self.path, self._log_fd) and _same_file(self.path + CHAIN_SUFFIX, self._chain_fd)):
            self._finish_rotation()
            self._open()  # another process rotated (or the files were replaced)
        if self._tip is None or os.fstat(self._chain_fd).st_size != self._chain_seen:
            self._tip = self._read_tip()
        return self._tip

    def _record(self, tip: Tip, lines: list[bytes], key, now_ns: int, size_after: int, gap: str = "", partial: bool = False) -> Tip:
        batch = chain_batch(tip.chain, lines)
        rec = checkpoint_line(tip, batch, size_after=size_after, now_ns=now_ns, key=key, gap=gap, partial=partial)
        _write_all(self._chain_fd, rec.encode("ascii") + b"\n")
        return Tip(gen=tip.gen, seq=tip.seq + 1, lines=tip.lines + batch.count, size=size_after, chain=batch.chain, keep=tip.keep)

    # -- appending ----------------------------------------------------------------------------
    def append(self, lines: list[bytes], key, now_ns: int | None = None) -> None:
        """Append `lines` (signed event lines, no newlines) and their checkpoint record."""
        now = now_ns if now_ns is not None else time.time_ns()
        data = b"".join(x + b"\n" for x in lines)
        with self._locked():
            tip = self._current_tip()
            tip = self._seal(tip, key, now)
            size = os.fstat(self._log_fd).st_size
            if size > 0 and size + len(data) > self._caps.rotate_bytes:
                tip = self._rotate(tip, key, now)
                size = 0
            # Lines first, then their record: a crash in between leaves lines the next writer
            # seals as a crash, never a record of lines that are not there.
            _write_all(self._log_fd, data)
            self._tip = self._record(tip, lines, key, now, size + len(data))
            self._chain_seen = os.fstat(self._chain_fd).st_size

    def _seal(self, tip: Tip, key, now_ns: int) -> Tip:
        """Record lines found beyond the last checkpoint (a crashed writer's, or a log that had no
        checkpoint file), and open an empty checkpoint file with a record of no lines."""
        size = os.fstat(self._log_fd).st_size
        if size <= tip.size:
            if tip.seq == 0:  # a new file: its first record links it to its predecessor
                tip = self._record(tip, [], key, now_ns, size)
            return tip
        gap = GAP_UNCHAINED if tip.seq == 0 else GAP_CRASH
        with _reading(self.path, self._log_fd) as rfd:
            return self._seal_from(tip, rfd, size, gap, key, now_ns)

    def _seal_from(self, tip: Tip, rfd: int, size: int, gap: str, key, now_ns: int) -> Tip:
        partial = os.pread(rfd, 1, size - 1) != b"\n"
        if partial:  # end the fragment, so the next line does not continue it
            _write_all(self._log_fd, b"\n")
            size += 1
        offset, pos, pending = tip.size, tip.size, b""
        while offset < size:
            block = os.pread(rfd, min(4 << 20, size - offset), offset)
            if not block:
                break
            offset += len(block)
            parts = (pending + block).split(b"\n")
            pending = parts.pop()
            for i in range(0, len(parts), _SEAL_LINES):
                chunk = parts[i : i + _SEAL_LINES]
                pos += sum(len(x) + 1 for x in chunk)
                tip = self._record(tip, chunk, key, now_ns, pos, gap=gap, partial=partial and pos >= size)
        return tip

    def _rotate(self, tip: Tip, key, now_ns: int) -> Tip:
        """audit.jsonl -> .1 -> ... -> .keep (the oldest falls off), each with its checkpoint file;
        the new file's first record carries on the chain."""
        for n in range(self._caps.keep_rotated, 0, -1):
            src, dst = rotated_path(self.path, n - 1), rotated_path(self.path, n)
            for suffix in ("", CHAIN_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(src + suffix, dst + suffix)
        self._open()
        new = Tip(gen=tip.gen + 1, seq=0, lines=0, size=0, chain=tip.chain, keep=self._caps.keep_rotated)
        return self._record(new, [], key, now_ns, 0)


def snapshot_lock(path: str) -> int | None:
    """A shared lock on the log's lock file, when there is one (a copied log has none): held while
    a verifier opens the files and notes their sizes, so it never sees half an append."""
    try:
        fd = os.open(path + LOCK_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


__all__ = ["ChainedLog", "GENESIS", "last_record", "rotated_path", "snapshot_lock"]

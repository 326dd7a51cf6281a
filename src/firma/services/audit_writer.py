"""Signed audit log writer: requests hand events over without waiting; one thread signs and
appends them (file 0600), `close()` flushes everything queued."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import stat
import tempfile
import threading
from typing import Any

from ..core import auditfmt
from ..errors import AuditError

MAX_QUEUE = 100_000  # beyond this, events are counted as dropped rather than blocking a request


def load_or_create_key(path: str):
    """The signing key at path (PEM PKCS#8, P-256), created 0600 when absent.

    A new key is written to a private temp file and linked into place, so a concurrent launcher
    sharing the state dir sees either no key or a complete one, never a half-written file."""
    key = _load_key(path)
    if key is not None:
        return key
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".audit.key.", dir=directory)  # 0600
    except OSError as exc:
        raise AuditError(f"cannot create audit key {path}: {exc.strerror}; fix the state directory permissions") from None
    try:
        with os.fdopen(fd, "wb") as f:
            key = auditfmt.generate_key()
            f.write(auditfmt.key_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return key
    except FileExistsError:
        pass  # a concurrent launcher linked its key first: use that one
    except OSError as exc:
        raise AuditError(f"cannot create audit key {path}: {exc.strerror}; fix the state directory permissions") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    key = _load_key(path)
    if key is None:
        raise AuditError(f"audit key {path} vanished while it was being created; retry")
    return key


def _load_key(path: str):
    """The existing key at path, None when there is none; refuses links and loose modes."""
    try:
        kfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot load audit key {path}: {exc.strerror}; remove it to generate a new one") from None
    with os.fdopen(kfd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"audit key {path} is not a regular file; remove it")
        if st.st_mode & 0o077:
            raise AuditError(f"audit key {path} is readable by group/others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        try:
            return auditfmt.load_private_pem(f.read())
        except ValueError as exc:
            raise AuditError(f"cannot load audit key {path}: {exc}; remove it to generate a new one") from None


class AuditWriter:
    def __init__(self, path: str, key) -> None:
        self.path = path
        self._key = key
        self.dropped = 0
        self.written = 0
        self.failed: str | None = None  # set once a write fails; the sidecar then refuses traffic
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}; fix --audit or its directory") from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="firma-audit", daemon=True)
        self._thread.start()

    def submit(self, **values: Any) -> None:
        """Queue one event (never blocks; counts a drop when the queue is full or closed)."""
        with self._lock:
            if self._closed or self._pending >= MAX_QUEUE:
                self.dropped += 1
                return
            self._pending += 1
        self._q.put(auditfmt.make_event(**values))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            batch = [item]
            try:
                while len(batch) < 512:
                    batch.append(self._q.get_nowait())
            except queue.Empty:
                pass
            stop = False
            lines = []
            for ev in batch:
                if ev is None:
                    stop = True
                    continue
                lines.append(auditfmt.signed_line(ev, self._key) + "\n")
            if lines:
                try:
                    self._file.write("".join(lines))
                    self._file.flush()
                    self.written += len(lines)
                except (OSError, ValueError) as exc:
                    self.dropped += len(lines)
                    self.failed = self.failed or f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._pending -= len(lines)
            if stop:
                break

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(None)
        self._thread.join()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except (OSError, ValueError):
            pass
        try:
            self._file.close()
        except (OSError, ValueError):
            pass

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

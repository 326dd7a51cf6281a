"""Signed audit log writer: requests hand events over without waiting; one thread signs and
appends them with their chain checkpoint (services.audit_chainfile), `close()` flushes everything
queued.

Bounds (core.auditcaps, DESIGN §9 "Caps"): string fields are capped; beyond the per-sandbox rate,
events are counted into exact suppression records; events lost to a full queue are recorded as
a count; `disk_low()` tells the sidecar to refuse traffic before the disk fills.

Given a key path, the writer checks the key file at once (no link, regular, 0600, PEM armour;
a missing key is created then) and parses it on its own thread when it is first needed: the first
event, `ready()` (which the sidecar awaits before it lets any request out), or `load_soon()`.
Importing cryptography and parsing the key costs ~10–20 ms: `firma run`'s services process asks
for it as soon as it serves, while the agent starts, so the first request does not wait for it.
A key that then fails to parse sets `failed`, so the sidecar refuses traffic (no unaudited
egress)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from typing import Any, Callable

from .audit_chainfile import ChainedLog
from .audit_files import free_bytes, load_or_create_key, parse_key, read_key_file
from ..core import auditcaps, auditfmt
from ..errors import AuditError

_LOAD_KEY = object()  # queue marker: load the key now (see ready)
MAX_QUEUE = 100_000  # beyond this, events are counted as dropped rather than blocking a request
MAX_BATCH = 512  # events signed and appended under one checkpoint
BATCH_WINDOW_SECS = 0.02  # how long the first event of a batch waits for others (see _next_batch)


class AuditWriter:
    def __init__(self, path: str, key=None, *, key_path: str | None = None, caps: auditcaps.AuditCaps | None = None,
                 clock: Callable[[], float] = time.monotonic, free_space: Callable[[str], int] = free_bytes,
                 batch_window: float = BATCH_WINDOW_SECS) -> None:
        """`key`: a loaded key; or `key_path`: checked now, parsed or created on the writer's
        thread (see `ready`). `clock` (seconds) drives the per-second caps and `free_space`
        (bytes free for a directory) the disk check: both injectable for tests. `batch_window`:
        how long the first event of a batch waits for others (see `_next_batch`)."""
        if (key is None) == (key_path is None):
            raise ValueError("AuditWriter needs exactly one of key and key_path")
        self.path = path
        self._key_ready: concurrent.futures.Future = concurrent.futures.Future()
        self._key_requested = False
        self._key_path = key_path
        self._key_pem = None
        if key_path is not None:
            self._key_pem = read_key_file(key_path)  # AuditError now, not later
            if self._key_pem is None:  # a new state dir: the key is made now, once
                key = load_or_create_key(key_path)
        self._key = key
        if key is not None:
            self._key_ready.set_result(key)
        self.caps = caps or auditcaps.AuditCaps()
        self._clock = clock
        self._batch_window = batch_window
        self._free_space = free_space
        self._disk_checked: float | None = None
        self._disk_low = False
        self._throttle = auditcaps.EventThrottle(self.caps)
        self.dropped = 0
        self.queue_dropped = 0  # of which lost to a full queue: recorded in the log as a count
        self._drops_recorded = 0
        self.suppressed = 0  # events counted into suppression records instead of written one by one
        self.written = 0
        self.failed: str | None = None  # set once a write fails; the sidecar then refuses traffic
        self._log = ChainedLog(path, self.caps)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="firma-audit", daemon=True)
        self._thread.start()

    def submit(self, **values: Any) -> None:
        """Queue one event (never blocks; counts a drop when the queue is full or closed)."""
        ev = auditcaps.cap_event(auditfmt.make_event(**values), self.caps.field_bytes)
        now = self._clock()
        with self._lock:
            if self._closed or self._pending >= MAX_QUEUE:
                self.dropped += 1
                self.queue_dropped += not self._closed
                return
            write, ended = self._throttle.admit(ev, now)
            self.suppressed += not write
            self._pending += len(ended) + write
            # Queued under the lock, so a suppression record never overtakes what it follows.
            for item in ended:
                self._q.put(item)
            if write:
                self._q.put(ev)

    def disk_low(self) -> bool:
        """Whether the log's filesystem has less than `caps.min_free_bytes` free, measured at most
        once per `caps.free_check_secs` (an unreadable measurement counts as enough space)."""
        now = self._clock()
        if self._disk_checked is None or now - self._disk_checked >= self.caps.free_check_secs:
            self._disk_checked = now
            try:
                self._disk_low = self._free_space(os.path.dirname(os.path.abspath(self.path))) < self.caps.min_free_bytes
            except OSError:
                self._disk_low = False
        return self._disk_low

    def load_soon(self) -> bool:
        """Ask the writer's thread to load the key now, without waiting (the services process
        does so once it serves, so the agent's first request finds the key ready). False once
        the writer is closed."""
        with self._lock:
            request = not self._key_requested and not self._closed
            self._key_requested = True
            closed = self._closed
        if request:
            self._q.put(_LOAD_KEY)
        return not closed

    async def ready(self) -> None:
        """Returns once the signing key is loaded (asking the writer's thread to load it now);
        raises its AuditError otherwise."""
        if not self._key_ready.done():
            if not self.load_soon() and not self._key_ready.done():
                raise AuditError(f"audit log {self.path} is closed")
            await asyncio.wrap_future(self._key_ready)
        self._key_ready.result()  # raises the load error

    def _load(self) -> bool:
        if self._key_ready.done():
            return True
        try:
            assert self._key_pem is not None and self._key_path is not None  # a new key was made (and set) in __init__
            self._key = parse_key(self._key_pem, self._key_path)
            self._key_ready.set_result(self._key)
            return True
        except BaseException as exc:  # noqa: BLE001 - reported through ready()
            self.failed = str(exc)
            self._key_ready.set_exception(exc)
            return False

    def _next_batch(self) -> list:
        try:
            batch = [self._q.get(timeout=self.caps.free_check_secs)]
        except queue.Empty:
            batch = []
        # Events gather for a moment before they are signed and appended: one checkpoint (and
        # one lock, one wake-up of this thread) per batch instead of per event. This thread
        # shares the interpreter lock with the sidecar's loop, and working event by event it
        # added ~0.3 ms to every small request on two CPUs (bench/egress.py). The close marker
        # and a key request end the wait at once.
        deadline = time.monotonic() + self._batch_window if batch and batch[0] is not None and \
            batch[0] is not _LOAD_KEY else 0.0
        try:
            while len(batch) < MAX_BATCH and batch[-1] is not None and batch[-1] is not _LOAD_KEY:
                left = deadline - time.monotonic()
                batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
        except (queue.Empty, IndexError):
            pass
        with self._lock:  # seconds that ended without a later event still get their records
            ended = self._throttle.expire(self._clock())
            self._pending += len(ended)
        return batch + ended

    def _run(self) -> None:
        signing: bool | None = None  # unknown until the first event or key request
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            stop = False
            lines: list[bytes] = []
            if signing is None and any(ev is not None and ev is not _LOAD_KEY for ev in batch):
                signing = self._load()
            unsigned = 0
            for ev in batch:
                if ev is None:
                    stop = True
                elif ev is _LOAD_KEY:
                    if signing is None:
                        signing = self._load()
                elif signing:
                    lines.append(auditfmt.signed_line(ev, self._key).encode("utf-8"))
                else:  # no key: nothing can be signed (the sidecar refuses traffic already)
                    unsigned += 1
            self.dropped += unsigned
            events = len(lines)
            with self._lock:
                lost = self.queue_dropped - self._drops_recorded
                self._drops_recorded = self.queue_dropped
            if lost and signing:
                lines.append(auditfmt.signed_line(auditcaps.dropped_record(lost), self._key).encode("utf-8"))
            if lines:
                try:
                    self._log.append(lines, self._key)
                    self.written += events
                except (OSError, ValueError, AuditError) as exc:
                    self.dropped += events
                    self.failed = self.failed or f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._pending -= events + unsigned
            if stop:
                break
        if not self._key_ready.done():  # closed before anything needed the key
            self._key_ready.set_exception(AuditError(f"audit log {self.path} is closed"))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ended = self._throttle.flush()  # the last second's suppression records
            self._pending += len(ended)
            for item in ended:
                self._q.put(item)
        self._q.put(None)
        self._thread.join()
        self._log.fsync()
        self._log.close()

    async def aclose(self) -> None:
        with self._lock:
            idle = self._pending == 0 and (not self._key_requested or self._key_ready.done())
        if idle:  # nothing to sign or write: closing is immediate, no worker thread needed
            self.close()
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.close)

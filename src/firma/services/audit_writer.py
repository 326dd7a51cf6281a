"""Signed audit log writer: requests hand events over without waiting; one thread signs and
appends them (file 0600), `close()` flushes everything queued.

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
from typing import Any

from .audit_files import load_or_create_key, open_audit_log, parse_key, read_key_file
from ..core import auditfmt
from ..errors import AuditError

_LOAD_KEY = object()  # queue marker: load the key now (see ready)
MAX_QUEUE = 100_000  # beyond this, events are counted as dropped rather than blocking a request


class AuditWriter:
    def __init__(self, path: str, key=None, *, key_path: str | None = None) -> None:
        """`key`: a loaded key; or `key_path`: checked now, parsed or created on the writer's
        thread (see `ready`)."""
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
        self.dropped = 0
        self.written = 0
        self.failed: str | None = None  # set once a write fails; the sidecar then refuses traffic
        self._file = os.fdopen(open_audit_log(path), "a", encoding="utf-8")
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

    def _run(self) -> None:
        signing: bool | None = None  # unknown until the first event or key request
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
            if signing is None and any(ev is not None for ev in batch):
                signing = self._load()
            for ev in batch:
                if ev is None:
                    stop = True
                elif ev is _LOAD_KEY:
                    pass
                elif signing:
                    lines.append(auditfmt.signed_line(ev, self._key) + "\n")
                else:  # no key: nothing can be signed (the sidecar refuses traffic already)
                    self.dropped += 1
                    with self._lock:
                        self._pending -= 1
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
        if not self._key_ready.done():  # closed before anything needed the key
            self._key_ready.set_exception(AuditError(f"audit log {self.path} is closed"))

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
        with self._lock:
            idle = self._pending == 0 and (not self._key_requested or self._key_ready.done())
        if idle:  # nothing to sign or write: closing is immediate, no worker thread needed
            self.close()
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.close)

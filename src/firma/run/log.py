"""firma's own log lines during a run (no asyncio: the synchronous launcher imports this)."""

from __future__ import annotations

import os
import time
from typing import TextIO

from .. import privfs

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "off": 100}


def now() -> str:
    """UTC now as 2026-01-02T03:04:05.678Z (via time, not datetime: launch latency)."""
    secs, ns = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"


class RunLog:
    """firma's log lines: always to run.log (and --log-file); to the terminal only while no agent
    owns it, and only at or above the terminal level."""

    def __init__(self, terminal: TextIO, level: str | None) -> None:
        self._terminal = terminal
        self._term_level = LEVELS.get((level or "warn").strip().lower(), 30)
        self._files: list[TextIO] = []
        self.quiet = False  # True while the agent runs

    def add_file(self, path: str) -> None:
        """Also write every line to `path` (private: no link followed, the caller's own file)."""
        try:
            fd = privfs.open_append(path)
        except OSError as exc:
            raise privfs.PrivatePathError(f"cannot open log file {path}: {exc.strerror}; choose another path") from None
        self._files.append(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))

    def __call__(self, msg: str, level: str = "info") -> None:
        n = LEVELS.get(level, 20)
        self._to_files(f"{now()} {level.upper():5} firma: {msg}\n")
        if not self.quiet and n >= self._term_level:
            try:
                self._terminal.write(f"firma: {level.upper()} {msg}\n")
                self._terminal.flush()
            except (OSError, ValueError):
                pass

    def _to_files(self, line: str) -> None:
        for f in self._files:
            try:
                f.write(line)
            except (OSError, ValueError):
                pass

    def block(self, text: str) -> None:
        """A report the user must see (the post-run findings): on the terminal whatever the level,
        and in the log files line by line."""
        for line in text.splitlines():
            self._to_files(f"{now()} WARN  {line}\n")
        try:
            self._terminal.write(text)
            self._terminal.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()


"""Audit append throughput (not a test): signed event lines appended with the hash chain and its
signed checkpoint record per batch (services.audit_chainfile), against the same signed lines
appended plainly. Medians of ROUNDS runs and their ratio; signing the events is included in both,
as the writer thread does it."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from firma.core import auditfmt
from firma.core.auditcaps import AuditCaps
from firma.services.audit_chainfile import ChainedLog

EVENTS = 20_000
ROUNDS = 5


def _lines(key, n):
    return [auditfmt.signed_line(auditfmt.make_event(sandbox_id="sbx_bench", action="http.request",
                                                     resource=f"http://h.test/{i}", decision=2,
                                                     deny_reason="host_not_allowed"), key).encode()
            for i in range(n)]


def plain(directory, key, batch):
    fd = os.open(os.path.join(directory, "plain.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t = time.perf_counter()
    for i in range(0, EVENTS, batch):
        os.write(fd, b"".join(x + b"\n" for x in _lines(key, min(batch, EVENTS - i))))
    dt = time.perf_counter() - t
    os.close(fd)
    return EVENTS / dt


def chained(directory, key, batch):
    log = ChainedLog(os.path.join(directory, "chained.jsonl"), AuditCaps())
    t = time.perf_counter()
    for i in range(0, EVENTS, batch):
        log.append(_lines(key, min(batch, EVENTS - i)), key)
    dt = time.perf_counter() - t
    log.close()
    return EVENTS / dt


def main() -> None:
    key = auditfmt.generate_key()
    print(f"{'batch':>6}  {'plain ev/s':>11}  {'chained ev/s':>12}  ratio")
    for batch in (1, 32, 512):
        p, c = [], []
        for _ in range(ROUNDS):
            with tempfile.TemporaryDirectory() as d:
                p.append(plain(d, key, batch))
                c.append(chained(d, key, batch))
        mp, mc = statistics.median(p), statistics.median(c)
        print(f"{batch:>6}  {mp:>11.0f}  {mc:>12.0f}  {mc / mp:.2f}")


if __name__ == "__main__":
    main()

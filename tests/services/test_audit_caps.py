"""Audit bounds (DESIGN §9 "Caps"): a flood of long denied requests from one sandbox stays within
the field and rate caps with exact suppression counts; low disk space refuses traffic with a
reason the client and the audit both see; events lost to a full queue are recorded as a count."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

from firma.core import auditcaps
from firma.core.auditcaps import AuditCaps, suppressed_count
from firma.core.record import replace
from firma.services import audit_writer
from firma.services.audit_files import load_or_create_key
from firma.services.audit_writer import AuditWriter

from upstreams import Stack, run, send_raw

FIRMA = [sys.executable, "-m", "firma"]
LONG = "/" + "p" * (120 * 1024)


def events(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_flood_of_long_denied_requests_stays_within_caps(tmp_path):
    """10 000 denials with 120 KB paths from one sandbox, all in one second of the writer's clock
    (injected: no timing in the assertions), submitted as the sidecar submits them."""
    path = tmp_path / "audit.jsonl"
    key = load_or_create_key(str(tmp_path / "audit.key"))
    w = AuditWriter(str(path), key, clock=lambda: 1000.0)
    for i in range(10_000):
        # three resources (differing within the kept 4 KiB), then thousands of distinct ones
        resource = f"http://evil{i % 3 if i < 5000 else i}.test{LONG}"
        w.submit(session_id="s", agent_id="a", sandbox_id="sbx_flood", action="http.request", resource=resource,
                 decision=auditfmt_deny(), deny_reason="host_not_allowed", bundle_version="v")
    w.close()
    evs = events(path)
    caps = AuditCaps()
    for ev in evs:
        for name, value in ev.items():
            assert len(str(value).encode()) <= caps.field_bytes, name
    individual = [e for e in evs if not suppressed_count(e)]
    records = [e for e in evs if suppressed_count(e)]
    assert len(individual) == caps.events_per_sec
    assert all(e["resource"].endswith("bytes]") and "...[truncated " in e["resource"] for e in individual)
    assert sum(map(suppressed_count, records)) == 10_000 - len(individual)  # exact: nothing silently dropped
    assert len(records) <= caps.keys_per_sec + 1  # one overflow record for the distinct-resource tail
    overflow = [e for e in records if e["resource"] == auditcaps.ANY]
    assert len(overflow) == 1 and overflow[0]["deny_reason"].startswith("suppressed:") and overflow[0]["decision"] == 2
    assert all(r["deny_reason"].endswith(":host_not_allowed") for r in records if r["resource"] != auditcaps.ANY)
    assert w.suppressed == 10_000 - len(individual) and w.dropped == 0
    v = subprocess.run(FIRMA + ["audit", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr


def auditfmt_deny():
    from firma.core import auditfmt

    return auditfmt.DENY


def test_rate_is_per_second_of_the_clock(tmp_path):
    path = tmp_path / "audit.jsonl"
    key = load_or_create_key(str(tmp_path / "audit.key"))
    now = [50.0]
    w = AuditWriter(str(path), key, clock=lambda: now[0], caps=AuditCaps(events_per_sec=3))
    for second in (50.0, 51.5):
        now[0] = second
        for _ in range(5):
            w.submit(sandbox_id="sbx", action="dns.query", resource="x.test A", decision=2, deny_reason="dns_refused")
    w.submit(sandbox_id="sbx_other", action="dns.query", resource="y.test A", decision=2)  # another sandbox's own budget
    w.close()
    evs = events(path)
    assert [suppressed_count(e) for e in evs] == [0, 0, 0, 2, 0, 0, 0, 0, 2]
    assert [e["deny_reason"] for e in evs if suppressed_count(e)] == ["suppressed:2:dns_refused"] * 2


def test_queue_drops_end_up_in_the_log(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    key = load_or_create_key(str(tmp_path / "audit.key"))
    monkeypatch.setattr(audit_writer, "MAX_QUEUE", 5)
    w = AuditWriter(str(path), key)
    gate, entered = threading.Event(), threading.Event()
    real = w._log.append

    def held(lines, k):
        entered.set()
        gate.wait(30)
        real(lines, k)

    w._log.append = held
    w.submit(sandbox_id="s0", action="http.request", decision=2)
    assert entered.wait(30)  # the writer is busy with the first event
    for i in range(1, 20):
        w.submit(sandbox_id=f"s{i}", action="http.request", decision=2)
    gate.set()
    w.close()
    evs = events(path)
    dropped = [e for e in evs if e["action"] == auditcaps.DROPPED_ACTION]
    assert w.queue_dropped == 15 and [e["deny_reason"] for e in dropped] == ["audit_dropped:15"]
    assert len(evs) - len(dropped) + w.queue_dropped == 20


def test_low_disk_refuses_traffic_and_says_so(tmp_path):
    measured = []

    def no_space(directory):
        measured.append(directory)
        return 5 << 20  # 5 MiB free

    async def main():
        s = Stack(tmp_path, bridge=False, allow=["127.0.0.1:9"])
        s.config = replace(s.config, audit_free_space=no_space)
        async with s:
            out = await send_raw(s.sidecar_port, b"GET http://127.0.0.1:9/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        return out, s

    out, s = run(main())
    assert out.startswith(b"HTTP/1.1 503") and b"x-firma-deny-reason: audit_disk_low" in out.lower()
    (ev,) = s.events()
    assert ev["deny_reason"] == "audit_disk_low" and ev["decision"] == 2
    assert measured == [str(tmp_path)]
    v = subprocess.run(FIRMA + ["audit", "verify", s.audit_path], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr


def test_disk_check_is_cached_per_interval(tmp_path):
    key = load_or_create_key(str(tmp_path / "audit.key"))
    now, calls = [10.0], []
    w = AuditWriter(str(tmp_path / "a.jsonl"), key, clock=lambda: now[0],
                    free_space=lambda d: calls.append(d) or (200 << 20))
    assert not w.disk_low() and not w.disk_low()
    now[0] = 11.5
    assert not w.disk_low()
    assert len(calls) == 2
    w.close()


def test_sidecar_flood_through_the_proxy_counts_exactly(tmp_path):
    """The sidecar's own path: 400 denied requests with 120 KB paths; every one is a line or
    counted, every field within 4 KiB."""

    async def main():
        async with Stack(tmp_path, bridge=False) as s:
            async def one(i):
                return await send_raw(s.sidecar_port, f"GET http://evil{i % 2}.test{LONG} HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_f\r\n\r\n".encode())

            outs = []
            for k in range(0, 400, 50):
                outs += await asyncio.gather(*(one(i) for i in range(k, k + 50)))
        return outs, s

    outs, s = run(main())
    assert all(o.startswith(b"HTTP/1.1 403") for o in outs)
    evs = s.events()
    individual = [e for e in evs if not suppressed_count(e)]
    assert len(individual) + sum(map(suppressed_count, evs)) == 400
    assert all(len(str(v).encode()) <= 4096 for e in evs for v in e.values())

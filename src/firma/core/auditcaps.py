"""Bounds on the audit (DESIGN §9 "Caps"), pure: the default limits in one place, field capping,
and the per-sandbox throttle that turns a flood into exact "N similar events suppressed" records.

The limits are constants for now (`AuditCaps()`); trusted configuration can later build another
`AuditCaps` and hand it to the sidecar."""

from __future__ import annotations

from typing import Any, Mapping

from . import auditfmt
from .record import record

SUPPRESSED = "suppressed"  # deny_reason of a suppression record: "suppressed:<count>:<original reason>"
DROPPED_ACTION = "audit.dropped"  # a record of events lost to a full queue: deny_reason "audit_dropped:<count>"
ANY = "*"  # resource/reason of the overflow record once a second has too many distinct keys


@record
class AuditCaps:
    events_per_sec: int = 200  # per sandbox; beyond, events are counted into suppression records
    keys_per_sec: int = 64  # distinct suppressed (action, resource, reason) keys per sandbox-second
    field_bytes: int = 4096  # every recorded string field, after escaping
    min_free_bytes: int = 100 << 20  # below this free on the log's filesystem, traffic is refused
    free_check_secs: float = 1.0
    rotate_bytes: int = 64 << 20
    keep_rotated: int = 4  # audit.jsonl.1 .. audit.jsonl.4 (plus their checkpoint files)


def cap_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, the cut marked with how much was removed."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    keep = max(0, limit - 32)  # room for the marker
    kept = raw[:keep].decode("utf-8", "ignore")
    return f"{kept}...[truncated {len(raw) - len(kept.encode('utf-8'))} bytes]"


def cap_event(event: dict, limit: int) -> dict:
    for k, v in event.items():
        if isinstance(v, str) and len(v) > limit // 4:  # cheap pre-check: 4 bytes per character at most
            event[k] = cap_text(v, limit)
    return event


class _Window:
    """One sandbox's current second."""

    __slots__ = ("sec", "written", "counts", "overflow")

    def __init__(self, sec: int) -> None:
        self.sec = sec
        self.written = 0
        self.counts: dict[tuple, list] = {}  # key -> [count, first event]
        self.overflow: dict[tuple, list] = {}  # (action, decision) -> [count, first event]


def _suppression(first: dict, count: int, resource: str, reason: str) -> dict:
    return auditfmt.make_event(
        session_id=first["session_id"], token_id=first["token_id"], agent_id=first["agent_id"],
        action=first["action"], resource=resource, decision=first["decision"],
        deny_reason=f"{SUPPRESSED}:{count}:{reason}", bundle_version=first["bundle_version"],
        sandbox_id=first["sandbox_id"],
    )


class EventThrottle:
    """At most `events_per_sec` events per sandbox and second are written as they are; the rest
    are counted per (action, resource, reason, decision) and written as one suppression record per
    key when the second ends. Counts are exact: every event is either written or counted."""

    def __init__(self, caps: AuditCaps) -> None:
        self._caps = caps
        self._windows: dict[str, _Window] = {}

    def admit(self, event: dict, now: float) -> tuple[bool, list[dict]]:
        """(write `event` itself?, suppression records of this sandbox's second that ended)."""
        sec = int(now)
        sandbox = event["sandbox_id"]
        w = self._windows.get(sandbox)
        ended: list[dict] = []
        if w is None or w.sec != sec:
            if w is not None:
                ended = self._records(w)
            w = self._windows[sandbox] = _Window(sec)
        if w.written < self._caps.events_per_sec:
            w.written += 1
            return True, ended
        key = (event["action"], event["resource"], event["deny_reason"], event["decision"])
        slot = w.counts.get(key)
        if slot is None and len(w.counts) >= self._caps.keys_per_sec:
            okey = (event["action"], event["decision"])
            slot = w.overflow.get(okey)
            if slot is None:
                slot = w.overflow[okey] = [0, event]
        elif slot is None:
            slot = w.counts[key] = [0, event]
        slot[0] += 1
        return False, ended

    def expire(self, now: float) -> list[dict]:
        """Suppression records of every second that has ended by `now`."""
        sec = int(now)
        out: list[dict] = []
        for sandbox, w in list(self._windows.items()):
            if w.sec < sec:
                out += self._records(w)
                del self._windows[sandbox]
        return out

    def flush(self) -> list[dict]:
        out: list[dict] = []
        for w in self._windows.values():
            out += self._records(w)
        self._windows.clear()
        return out

    @staticmethod
    def _records(w: _Window) -> list[dict]:
        out = [_suppression(first, n, key[1], key[2]) for key, (n, first) in w.counts.items()]
        out += [_suppression(first, n, ANY, ANY) for (n, first) in w.overflow.values()]
        return out


def dropped_record(count: int) -> dict:
    """The record of `count` events lost because the writer's queue was full."""
    return auditfmt.make_event(action=DROPPED_ACTION, decision=auditfmt.ABORT, deny_reason=f"audit_dropped:{count}")


def suppressed_count(event: dict[str, Any]) -> int:
    """How many events a suppression record stands for (0 for any other event)."""
    reason = event.get("deny_reason", "")
    if not isinstance(reason, str) or not reason.startswith(SUPPRESSED + ":"):
        return 0
    try:
        return int(reason.split(":", 2)[1])
    except (IndexError, ValueError):
        return 0


def from_config(bounds: Mapping[str, int]) -> AuditCaps:
    """AuditCaps from trusted `[audit]` keys (core.config.AUDIT_KEYS); the defaults elsewhere."""
    d = AuditCaps()
    return AuditCaps(
        events_per_sec=bounds.get("events_per_second", d.events_per_sec),
        keys_per_sec=d.keys_per_sec,
        field_bytes=bounds.get("field_bytes", d.field_bytes),
        min_free_bytes=bounds["min_free_mib"] << 20 if "min_free_mib" in bounds else d.min_free_bytes,
        free_check_secs=d.free_check_secs,
        rotate_bytes=bounds["rotate_mib"] << 20 if "rotate_mib" in bounds else d.rotate_bytes,
        keep_rotated=bounds.get("keep_rotated", d.keep_rotated),
    )

"""The run summary (DESIGN §4): what the sidecar denied this run, and the exact flag that would allow
each destination, built from the run's own audit events. Pure: events in, a value and its text
and JSON out.

The first thing a new user needs after a denied `pip install` is "which host do I allow?": the
tool's own error rarely names it."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .auditfmt import request_url
from .record import field, record

DENY = 2
ABORT = 3
# deny reasons a flag can lift, and what the flag must then be
_ALLOWABLE = frozenset({"host_not_allowed", "blocked_address"})
_WHY = {
    "policy_forbid": "a Cedar forbid rule in your policy denies it; change the policy",
    "policy_error": "the Cedar policy failed to evaluate; fix the policy",
    "sni_mismatch": "the TLS server name differs from the CONNECT host",
    "tls_required": "a tunnel to a name carries TLS for that name; for another protocol use --allow-tcp HOST:PORT",
    "ech_not_allowed": "encrypted ClientHello hides the server name",
    "resolve_failed": "the name did not resolve on the host",
    "upstream_unreachable": "allowed, but the upstream did not answer",
}


@record
class Destination:
    host: str
    port: int
    reason: str
    count: int
    flag: str | None  # the exact --allow-host that would allow it, when a flag can
    why: str = ""  # when no flag can, or what the flag means

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "reason": self.reason, "count": self.count,
                "allow_flag": self.flag, "why": self.why}


@record
class RunSummary:
    sandbox_id: str
    exit_status: int | None
    denied: tuple[Destination, ...] = ()
    dns_refused: Mapping[str, int] = field(default_factory=dict)  # name -> queries
    other_denials: Mapping[str, int] = field(default_factory=dict)  # reason -> count (malformed, limits)
    suppressed: int = 0  # events the audit aggregated (counted in the totals above when attributed)
    proof_path: str | None = None
    monitor: bool = False
    notes: tuple[str, ...] = ()  # limits hit, workspace findings: one line each

    @property
    def denied_total(self) -> int:
        return sum(d.count for d in self.denied) + sum(self.other_denials.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id, "exit_status": self.exit_status, "monitor": self.monitor,
            "denied_total": self.denied_total, "denied": [d.as_json() for d in self.denied],
            "dns_refused": dict(self.dns_refused), "other_denials": dict(self.other_denials),
            "notes": list(self.notes), "proof": self.proof_path,
        }


def _destination(action: str, resource: str) -> tuple[str, int] | None:
    """(host, port) of a decided request: `host:port` for connect, a URL for a proxy request."""
    if action == "http.request":
        resource = request_url(resource)
    if action == "http.request" and "://" in resource:
        from urllib.parse import urlsplit  # noqa: PLC0415 - only once a run has denials (launch latency)

        try:
            u = urlsplit(resource)
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            return None
        return (u.hostname or "", port) if u.hostname else None
    host, sep, digits = resource.rpartition(":")
    if not sep or not digits.isdigit():
        return None
    return host.strip("[]"), int(digits)


def _is_ip(host: str) -> bool:
    import ipaddress  # noqa: PLC0415 - only once a run has denials (launch latency)

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def allow_flag(host: str, port: int, reason: str) -> tuple[str | None, str]:
    """The exact `--allow-host` for a denied destination, and a note. An address literal or a name
    resolving to a non-public address is allowed only by an exact host:port."""
    if reason not in _ALLOWABLE:
        return None, _WHY.get(reason, f"denied: {reason}")
    shown = f"[{host}]" if ":" in host else host
    if reason == "blocked_address" or _is_ip(host):
        return (f"--allow-host {shown}:{port}",
                "a non-public address: only this exact host:port allows it" if reason == "blocked_address"
                else "an address literal: only this exact host:port allows it")
    return (f"--allow-host {shown}" if port in (80, 443) else f"--allow-host {shown}:{port}"), ""


def summarize(
    events: Iterable[Mapping[str, Any]], *, sandbox_id: str, exit_status: int | None,
    proof_path: str | None = None, monitor: bool = False, notes: tuple[str, ...] = (),
) -> RunSummary:
    """Count this sandbox's denials. Events of other sandboxes (the log is shared) are skipped."""
    dests: dict[tuple[str, int, str], int] = {}
    dns: dict[str, int] = {}
    other: dict[str, int] = {}
    suppressed = 0
    for e in events:
        if e.get("sandbox_id") != sandbox_id or e.get("decision") not in (DENY, ABORT):
            continue
        reason, action, resource = str(e.get("deny_reason", "")), str(e.get("action", "")), str(e.get("resource", ""))
        n = 1
        if reason.startswith("suppressed:"):  # an aggregate audit record: `suppressed:N:<reason>`
            _, n_text, reason = (reason.split(":", 2) + [""])[:3]
            n = int(n_text) if n_text.isdigit() else 1
            suppressed += n
            if resource == "*":
                resource = ""
        if action == "dns.query":
            name = resource.split(" ", 1)[0]
            dns[name] = dns.get(name, 0) + n
            continue
        where = _destination(action, resource) if resource else None
        if where is None:
            key = reason.split(":", 1)[0] or action
            other[key] = other.get(key, 0) + n
            continue
        k = (where[0], where[1], reason.split(":", 1)[0])  # `blocked_address:<ip>` counts as its code
        dests[k] = dests.get(k, 0) + n
    denied = []
    for (host, port, reason), count in sorted(dests.items(), key=lambda kv: (-kv[1], kv[0])):
        flag, why = allow_flag(host, port, reason)
        denied.append(Destination(host, port, reason, count, flag, why))
    return RunSummary(sandbox_id, exit_status, tuple(denied), dns, other, suppressed, proof_path, monitor, notes)


def render(s: RunSummary) -> str:
    """The block printed on stderr when the run ends (without --quiet)."""
    head = f"firma: run {s.sandbox_id} ended"
    head += f" with status {s.exit_status}" if s.exit_status is not None else ""
    lines = [head + (" (monitor mode: nothing was blocked)" if s.monitor else "")]
    verb = "would have been denied" if s.monitor else "denied"
    if s.denied:
        lines.append(f"  {verb}:")
        for d in s.denied:
            shown = f"[{d.host}]" if ":" in d.host else d.host
            what = f"    {shown}:{d.port}  ×{d.count}  ({d.reason})"
            if d.flag:
                what += f"  allow with: {d.flag}"
            lines.append(what)
            if d.why:
                lines.append(f"      {d.why}")
    for reason, count in sorted(s.other_denials.items()):
        lines.append(f"  {verb}: {count} request{'s' if count != 1 else ''} ({reason})")
    if s.dns_refused:
        names = ", ".join(f"{n} ×{c}" for n, c in sorted(s.dns_refused.items(), key=lambda kv: (-kv[1], kv[0]))[:10])
        more = len(s.dns_refused) - 10
        lines.append(f"  DNS refused inside (no rule could allow these names): {names}"
                     + (f" and {more} more" if more > 0 else ""))
    if s.suppressed:
        lines.append(f"  ({s.suppressed} similar events were aggregated in the audit)")
    if not (s.denied or s.other_denials or s.dns_refused):
        lines.append("  nothing was denied")
    lines += [f"  {n}" for n in s.notes]
    if s.proof_path:
        lines.append(f"  proof: {s.proof_path}")
    return "\n".join(lines) + "\n"

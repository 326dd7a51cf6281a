"""Pure judgement: observations of probe runs in, one pass/fail per invariant out.

An invariant passes only when (1) its positive control succeeded — the same probe run directly on
the host reached what it aimed at, so the probe is live and a silent result means something — and
(2) every check of the run through the runner held, judged on what the kit's listeners recorded
(the far side), not only on what the probe reported."""

from __future__ import annotations

from typing import Any

from ...core.model import Check
from ...core.record import record, field


@record
class RunObservation:
    side: str  # "runner" or "control"
    nonce: str
    exit_code: int | None  # None: did not exit in time (killed)
    stdout: str = ""
    stderr: str = ""
    evidence: dict[str, Any] | None = None  # the probe's `result`, only when the nonce matched
    evidence_file: str | None = None
    trap_tcp: tuple[bytes, ...] = ()  # payloads that reached the must-not-connect listener
    trap_tcp6: tuple[bytes, ...] | None = None  # None: no IPv6 loopback on this host
    trap_udp: tuple[bytes, ...] = ()
    upstream_paths: tuple[str, ...] = ()
    dns_queries: tuple[str, ...] = ()  # names the host DNS stub saw during this run
    ready_seen: bool | None = None  # handshake probes: the READY line arrived


@record
class InvariantResult:
    invariant: str
    ok: bool
    evidence: str  # one line: why it passed or the first failed check
    checks: tuple[Check, ...] = ()
    files: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "result": "pass" if self.ok else "fail",
            "evidence": self.evidence,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "files": list(self.files),
        }


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _any_tag(items: tuple[bytes, ...], tag: str) -> bool:
    return any(tag.encode() in x for x in items)


def _paths_with(obs: RunObservation, frag: str) -> list[str]:
    return [p for p in obs.upstream_paths if frag in p]


class _Builder:
    def __init__(self, invariant: str) -> None:
        self.invariant = invariant
        self.checks: list[Check] = []
        self.files: list[str] = []

    def add(self, side: str, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(f"{side}: {name}", bool(ok), detail))

    def ran(self, obs: RunObservation) -> bool:
        """The probe ran to the end: its evidence file with the right nonce exists."""
        if obs.evidence_file:
            self.files.append(obs.evidence_file)
        ok = obs.evidence is not None
        self.add(
            obs.side,
            "probe ran and wrote evidence",
            ok,
            (obs.evidence_file or "") if ok else f"no evidence; exit {obs.exit_code}; stderr: {obs.stderr.strip()[-200:]}",
        )
        return ok

    def result(self) -> InvariantResult:
        controls = [c for c in self.checks if c.name.startswith("control")]
        failed = [c for c in self.checks if not c.ok]
        if any(not c.ok for c in controls):
            bad = next(c for c in controls if not c.ok)
            why = f"positive control failed, probe not trustworthy: {bad.name} ({bad.detail})"
        elif failed:
            why = f"{failed[0].name}" + (f" ({failed[0].detail})" if failed[0].detail else "")
        else:
            why = f"{len(self.checks)} checks held, positive control ok"
        return InvariantResult(self.invariant, not failed, why, tuple(self.checks), tuple(self.files))


def judge_sidecar_only_egress(control: RunObservation, inside: RunObservation, token: str) -> InvariantResult:
    b = _Builder("sidecar_only_egress")
    c, i = control, inside
    if b.ran(c):
        b.add("control", "request via the proxy reached the upstream",
              _get(c.evidence, "via_proxy", "ok") and token in _get(c.evidence, "via_proxy", "body", default=""))
        b.add("control", "direct connect to the trap listener arrived", _any_tag(c.trap_tcp, f"egress-{c.nonce}"))
        b.add("control", "the sidecar denies the disallowed destination (403)",
              _get(c.evidence, "via_proxy_denied", "status") == 403)
        b.add("control", "direct request to the upstream arrived", bool(_paths_with(c, f"/egress/{c.nonce}/direct")))
    if b.ran(i):
        vp = _get(i.evidence, "via_proxy", default={})
        b.add("runner", "allowed request via proxy_url reached the upstream",
              bool(vp.get("ok")) and token in vp.get("body", "") and bool(_paths_with(i, f"/egress/{i.nonce}/proxied")),
              f"status {vp.get('status')} error {vp.get('error')}")
        vd = _get(i.evidence, "via_proxy_denied", default={})
        b.add("runner", "proxy_url leads to the policy sidecar (a disallowed destination gets its 403 deny)",
              vd.get("status") == 403 and '"denied"' in vd.get("body", ""),
              f"status {vd.get('status')} error {vd.get('error')}")
        b.add("runner", "direct connect to the trap listener failed",
              not _get(i.evidence, "direct_trap", "connected"),
              "connected" if _get(i.evidence, "direct_trap", "connected") else str(_get(i.evidence, "direct_trap", "error")))
        b.add("runner", "direct request to the upstream failed",
              not _get(i.evidence, "direct_upstream", "ok"),
              f"status {_get(i.evidence, 'direct_upstream', 'status')}" if _get(i.evidence, "direct_upstream", "ok")
              else str(_get(i.evidence, "direct_upstream", "error")))
    b.add("runner", "nothing reached the trap listener", not i.trap_tcp, f"{len(i.trap_tcp)} connection(s) arrived")
    b.add("runner", "no direct request reached the upstream", not _paths_with(i, f"/egress/{i.nonce}/direct"),
          ", ".join(_paths_with(i, f"/egress/{i.nonce}/direct")))
    return b.result()


def judge_dns_confined(control: RunObservation, inside: RunObservation) -> InvariantResult:
    b = _Builder("dns_confined")
    c, i = control, inside
    if b.ran(c):
        b.add("control", "query to the loopback resolver stand-in arrived and was answered",
              _get(c.evidence, "explicit_udp", "reply") and _any_tag(c.trap_udp, f"explicit-{c.nonce}"))
    b.add("runner", "nothing reached the loopback resolver stand-in", not i.trap_udp,
          f"{len(i.trap_udp)} datagram(s) arrived")
    if b.ran(i):
        gai = _get(i.evidence, "getaddrinfo", default={})
        b.add("runner", "name lookup was attempted inside (host loopback cut off, resolver on loopback)",
              bool(gai.get("ran")), gai.get("why") or f"nameservers {_get(i.evidence, 'nameservers')}")
        b.add("runner", "getaddrinfo returned nothing", bool(gai.get("ran")) and not gai.get("addresses"),
              f"addresses {gai.get('addresses')}")
        name = (gai.get("name") or "").lower().rstrip(".")
        b.add("runner", "the host DNS stub saw the query",
              bool(name) and any(q.lower().rstrip(".") == name for q in i.dns_queries),
              f"stub saw {list(i.dns_queries)[:4]}")
        b.add("runner", "query to the loopback resolver stand-in got no answer",
              not _get(i.evidence, "explicit_udp", "reply"))
    return b.result()


def judge_fail_closed_startup(
    control_host: RunObservation, control_runner: RunObservation, inside: RunObservation
) -> InvariantResult:
    b = _Builder("fail_closed_startup")
    b.ran(control_host)
    b.add("control", "runner starts the probe when bridge and DNS stub are up",
          control_runner.evidence is not None and control_runner.exit_code == 0,
          f"exit {control_runner.exit_code}; stderr: {control_runner.stderr.strip()[-300:]}")
    if control_runner.evidence_file:
        b.files.append(control_runner.evidence_file)
    b.add("runner", "with the bridge and DNS stub unavailable the command never started",
          inside.evidence is None, "probe wrote evidence: the command ran" if inside.evidence else "")
    b.add("runner", "runner exited non-zero", inside.exit_code not in (0, None), f"exit {inside.exit_code}")
    b.add("runner", "nothing reached the kit's listeners",
          not inside.trap_tcp and not inside.trap_udp and not inside.upstream_paths)
    return b.result()


def judge_fail_closed_runtime(control: RunObservation, inside: RunObservation) -> InvariantResult:
    b = _Builder("fail_closed_runtime")
    c, i = control, inside
    if b.ran(c):
        b.add("control", "request via the proxy worked before the bridge was killed", _get(c.evidence, "before", "ok"))
        b.add("control", "direct request after the kill reached the upstream",
              bool(_paths_with(c, f"/runtime/{c.nonce}/direct")))
    b.add("runner", "probe reached the kill point (READY handshake)", bool(i.ready_seen))
    if b.ran(i):
        b.add("runner", "request via proxy_url worked before the bridge was killed",
              _get(i.evidence, "before", "ok"), str(_get(i.evidence, "before", "error")))
        b.add("runner", "request via proxy_url failed after the bridge was killed",
              not _get(i.evidence, "after", "ok"), f"status {_get(i.evidence, 'after', 'status')}")
        b.add("runner", "no direct fallback (direct request and trap connect failed)",
              not _get(i.evidence, "direct_upstream", "ok") and not _get(i.evidence, "direct_trap", "connected"))
    b.add("runner", "no request reached the upstream after the kill",
          not _paths_with(i, f"/runtime/{i.nonce}/after") and not _paths_with(i, f"/runtime/{i.nonce}/direct"))
    b.add("runner", "nothing reached the trap listener", not i.trap_tcp)
    return b.result()


def judge_direct_bypass_resistant(control: RunObservation, inside: RunObservation) -> InvariantResult:
    b = _Builder("direct_bypass_resistant")
    c, i = control, inside
    raw_live = False
    if b.ran(c):
        b.add("control", "env -i child ran with no proxy variables and reached the upstream",
              _get(c.evidence, "env_i_child", "env_empty") and bool(_paths_with(c, f"/bypass/{c.nonce}/child")))
        b.add("control", "env -i child reached the trap listener", _any_tag(c.trap_tcp, f"bypass-{c.nonce}-child"))
        b.add("control", "unset-proxy stdlib client reached the upstream", bool(_paths_with(c, f"/bypass/{c.nonce}/noproxy")))
        b.add("control", "UDP datagram reached the trap listener", _any_tag(c.trap_udp, f"bypass-{c.nonce}-udp"))
        raw_live = _any_tag(c.trap_udp, f"bypass-{c.nonce}-raw")
        if c.trap_tcp6 is not None:
            b.add("control", "IPv6 loopback connect reached the trap listener", _any_tag(c.trap_tcp6, f"bypass-{c.nonce}-v6"))
        if _get(c.evidence, "sidecar_direct") is not None:
            b.add("control", "direct connect to the sidecar's port succeeded", _get(c.evidence, "sidecar_direct", "connected"))
    if b.ran(i):
        b.add("runner", "env -i child had an empty environment", _get(i.evidence, "env_i_child", "env_empty"),
              str(_get(i.evidence, "env_i_child", "error")))
    b.add("runner", "no direct request reached the upstream (env -i child, unset proxy vars)",
          not _paths_with(i, f"/bypass/{i.nonce}/"), ", ".join(_paths_with(i, f"/bypass/{i.nonce}/")))
    b.add("runner", "nothing reached the TCP trap listener", not i.trap_tcp, f"{len(i.trap_tcp)} arrived")
    b.add("runner", "no UDP datagram reached the trap listener",
          not _any_tag(i.trap_udp, f"bypass-{i.nonce}-udp"))
    if raw_live:
        b.add("runner", "no raw-socket datagram reached the trap listener",
              not _any_tag(i.trap_udp, f"bypass-{i.nonce}-raw"))
    else:
        # Not a pass by default: recorded so the report says what was not exercised.
        b.add("note", "raw-socket sub-probe not judged: the host control could not send one "
              "(needs CAP_NET_RAW)", True)
    if i.trap_tcp6 is not None:
        b.add("runner", "nothing reached the IPv6 trap listener", not i.trap_tcp6)
    if _get(c.evidence, "sidecar_direct") is not None:
        # Client-side observation (the real sidecar is not instrumented), backed by the control.
        b.add("runner", "direct connect to the sidecar's port failed",
              i.evidence is not None and not _get(i.evidence, "sidecar_direct", "connected"),
              str(_get(i.evidence, "sidecar_direct", "error")))
    return b.result()


def judge_preserve_stdio_signals_exit(
    control_stdio: RunObservation, inside_stdio: RunObservation,
    control_signal: RunObservation, inside_signal: RunObservation,
    control_death: RunObservation | None = None, inside_death: RunObservation | None = None,
) -> InvariantResult:
    b = _Builder("preserve_stdio_signals_exit")
    for obs in (control_stdio, inside_stdio):
        n, side = obs.nonce, obs.side
        b.ran(obs)
        b.add(side, "exit status 42 kept", obs.exit_code == 42, f"exit {obs.exit_code}")
        b.add(side, "stdout carried stdout only", f"OUT-{n}" in obs.stdout and f"ERR-{n}" not in obs.stdout)
        b.add(side, "stderr carried stderr only", f"ERR-{n}" in obs.stderr and f"OUT-{n}" not in obs.stderr)
        b.add(side, "stdin reached the command", f"IN-hello-{n}" in obs.stdout)
    for obs in (control_signal, inside_signal):
        b.add(obs.side, "probe reached the signal point (READY handshake)", bool(obs.ready_seen))
        b.ran(obs)
        b.add(obs.side, "SIGTERM sent to the runner reached the command",
              _get(obs.evidence, "signal") == "SIGTERM", f"probe saw {_get(obs.evidence, 'signal')}")
        b.add(obs.side, "exit status 7 from the signal handler kept", obs.exit_code == 7, f"exit {obs.exit_code}")
    for death in (control_death, inside_death):
        if death is None:
            continue
        obs = death
        b.add(obs.side, "uncaught SIGTERM: probe reached the signal point", bool(obs.ready_seen))
        b.ran(obs)
        b.add(obs.side, "death by SIGTERM reported as 143 (128+15)", obs.exit_code == 143, f"exit {obs.exit_code}")
    return b.result()


@record
class Report:
    runner: str
    evidence_dir: str
    results: tuple[InvariantResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "evidence_dir": self.evidence_dir,
            "passed": self.ok,
            "results": [r.as_dict() for r in self.results],
        }

    def table(self) -> str:
        width = max(len(r.invariant) for r in self.results) if self.results else 10
        lines = [f"{'invariant':<{width}}  result  evidence"]
        for r in self.results:
            lines.append(f"{r.invariant:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.evidence}")
        lines.append(f"evidence: {self.evidence_dir}")
        return "\n".join(lines)

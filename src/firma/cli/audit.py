"""`firma audit verify [FILE] [--public-key PEM] [--no-chain]` and `firma audit tail [filters]`."""

from __future__ import annotations

import json
import os
import sys
import time

from ..core.statelayout import audit_key_beside, audit_log_path
from ..errors import AuditError


def add_parser(sub):
    p = sub.add_parser("audit", help="verify or follow the signed audit log")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="<verify|tail>")
    v = asub.add_parser("verify", help="check every line's signature and the hash chain across rotated files; "
                                       "exit 1 naming the first broken position")
    v.add_argument("file", nargs="?", help="audit log (default <state root>/audit.jsonl); FILE.1, FILE.2, ... "
                                           "and their .chain checkpoint files are checked with it")
    v.add_argument("--public-key", metavar="PEM", help="public (or private) key PEM; default audit.key beside FILE")
    v.add_argument("--no-chain", action="store_true",
                   help="check only each line's signature (a log from before the chain or another implementation)")
    t = asub.add_parser("tail", help="print (and optionally follow) decisions")
    t.add_argument("file", nargs="?", help="audit log (default <state root>/audit.jsonl)")
    t.add_argument("--decision", choices=["allow", "deny", "abort"], action="append")
    t.add_argument("--not-allowed", action="store_true",
                   help="everything that was not plainly allowed: denies, aborts (e.g. resolve_failed) and "
                        "monitor-mode passes")
    t.add_argument("--sandbox-id")
    t.add_argument("--since", help="Unix seconds, ISO-8601 time, or a duration like 10m / 2h / 1d")
    t.add_argument("--json", action="store_true", help="print matching lines as JSON")
    t.add_argument("-n", "--lines", type=int, default=0, help="only the last N matching lines")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    return p


def _key_for(path: str, given: str | None):
    from ..core import auditfmt

    key_path = given or audit_key_beside(os.path.abspath(path))
    try:
        with open(key_path, "rb") as f:
            return auditfmt.load_public_pem(f.read())
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot load audit public key {key_path}: {exc}; pass --public-key PEM") from None


def _verify(path: str, public_key, no_chain: bool) -> int:
    from ..services import audit_verify

    if no_chain:
        n, bad = audit_verify.verify_signatures(path, public_key)
        if bad:
            for lineno, why in bad:
                print(f"line {lineno}: {why}", file=sys.stderr)
            print(f"FAIL: {len(bad)} of {n} lines do not verify: lines {', '.join(str(b[0]) for b in bad)}")
            return 1
        print(f"OK: {n} lines verified (signatures only)")
        return 0
    verdict = audit_verify.verify_series(path, public_key)
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    for brk in verdict.breaks:
        print(brk.describe(), file=sys.stderr)
    for name, lineno, why in verdict.bad_signatures:
        print(f"{name} line {lineno}: {why}", file=sys.stderr)
    if verdict.ok:
        notes = f"; {len(verdict.notes)} note(s) on stderr" if verdict.notes else ""
        print(f"OK: {verdict.lines} lines verified in {verdict.files} file(s), chain intact{notes}")
        return 0
    if verdict.breaks:
        more = f" (and {len(verdict.breaks) - 1} more on stderr)" if len(verdict.breaks) > 1 else ""
        print(f"FAIL: {verdict.breaks[0].describe()}{more}")
    if verdict.bad_signatures:
        sigs = verdict.bad_signatures
        print(f"FAIL: {len(sigs)} of {verdict.lines} lines do not verify: lines "
              f"{', '.join(f'{n}' if f == os.path.basename(path) else f'{f}:{n}' for f, n, _w in sigs)}")
    return 1


DECISIONS = {"allow": 1, "deny": 2, "abort": 3}
NAMES = {v: k for k, v in DECISIONS.items()}


def parse_since(text: str, now: float | None = None) -> int:
    """A lower bound in Unix ns."""
    import datetime as dt

    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return int((now - float(t[:-1]) * units[t[-1]]) * 1e9)
    if t.replace(".", "", 1).isdigit():
        return int(float(t) * 1e9)
    try:
        d = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError(f"invalid --since {text!r}; use Unix seconds, ISO-8601 or 10m/2h/1d") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp() * 1e9)


def matches(ev: dict, decisions: set[int] | None, sandbox_id: str | None, since_ns: int | None,
            not_allowed: bool = False) -> bool:
    if decisions and ev.get("decision") not in decisions:
        return False
    # A plain allow has no reason; a monitor-mode pass is an allow that carries the deny reason.
    # An aggregate of plain allows (`suppressed:N:` with no reason of its own) is plainly allowed.
    reason = str(ev.get("deny_reason") or "")
    if reason.startswith("suppressed:"):
        reason = (reason.split(":", 2) + [""])[2]
    if not_allowed and ev.get("decision") == DECISIONS["allow"] and not reason:
        return False
    if sandbox_id is not None and ev.get("sandbox_id") != sandbox_id:
        return False
    if since_ns is not None and int(ev.get("timestamp", 0) or 0) < since_ns:
        return False
    return True


def format_row(ev: dict) -> str:
    ts = int(ev.get("timestamp", 0) or 0) / 1e9
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
    d = ev.get("decision")
    dec = NAMES.get(d, str(d)) if isinstance(d, int) else str(d)
    return f"{when}  {dec:<5}  {ev.get('sandbox_id', '')[:36]:<36}  {ev.get('action', ''):<15}  {ev.get('resource', '')}  {ev.get('deny_reason', '')}".rstrip()


HEADER = f"{'TIME':<24}  {'DEC':<5}  {'SANDBOX':<36}  {'ACTION':<15}  RESOURCE  REASON"


def run(args) -> int:
    path = args.file
    if not path:
        from ..core.settings import state_root

        path = audit_log_path(state_root(os.environ, os.getuid()))
    if args.audit_command == "verify":
        return _verify(path, _key_for(path, args.public_key), args.no_chain)
    decisions = {DECISIONS[d] for d in args.decision} if args.decision else None
    since = parse_since(args.since) if args.since else None
    try:
        f = open(path, "r", encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    out: list[str] = []

    def emit(line: str) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if isinstance(ev, dict) and matches(ev, decisions, args.sandbox_id, since, args.not_allowed):
            out.append(json.dumps(ev) if args.json else format_row(ev))

    with f:
        for line in f:
            emit(line)
        rows = out[-args.lines :] if args.lines else out
        if not args.json:
            print(HEADER)
        for r in rows:
            print(r)
        sys.stdout.flush()
        if args.follow:
            try:
                while True:
                    line = f.readline()
                    if not line:
                        time.sleep(0.25)
                        continue
                    out.clear()
                    emit(line)
                    for r in out:
                        print(r, flush=True)
            except KeyboardInterrupt:
                return 0
    return 0

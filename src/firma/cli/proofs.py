"""`firma proofs`: the recent runs of this state root, newest first, from their proofs; and
`firma proofs --prune [--keep N]` (default `[state].keep_proofs`)."""

from __future__ import annotations

import json
import os

from .. import privfs
from ..core import settings
from ..core.statelayout import PROOFS
from ..host import detect_host
from ..run.state import prune_proofs

_MAX_PROOF_BYTES = 4 << 20


def add_parser(sub):
    p = sub.add_parser("proofs", help="list recent runs (their proofs), or prune old ones")
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="how many to list (default 20)")
    p.add_argument("--prune", action="store_true", help="remove all but the newest --keep proofs")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="with --prune (default: [state].keep_proofs)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def _rows(proofs_dir: str):
    try:
        entries = [e for e in os.scandir(proofs_dir) if e.name.startswith("sbx_") and e.name.endswith(".json")]
    except FileNotFoundError:
        return
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
    for e in entries:
        try:
            data, _ = privfs.read_private(e.path, _MAX_PROOF_BYTES, what="proof")
            doc = json.loads(data)
        except (OSError, ValueError, privfs.PrivatePathError):
            continue
        yield doc


def run(args) -> int:
    host = detect_host()
    root = settings.state_root(host.environ, host.uid)
    proofs_dir = os.path.join(root, PROOFS)
    if args.prune:
        keep = args.keep
        if keep is None:
            from ..configfiles import load

            keep = load(None, host.environ, os.getcwd()).keep_proofs
        removed = prune_proofs(proofs_dir, max(keep, 0))
        print(f"pruned {len(removed)} proofs; kept the newest {keep} in {proofs_dir}")
        return 0
    shown = 0
    for doc in _rows(proofs_dir):
        if shown >= args.limit:
            break
        shown += 1
        row = {
            "sandbox_id": doc.get("sandbox_id"), "started_at": doc.get("started_at"),
            "command": doc.get("command"), "exit_status": doc.get("exit_status"),
            "denied": doc.get("denied"), "enforced": doc.get("enforced"), "mode": doc.get("mode"),
        }
        if args.json:
            print(json.dumps(row))
            continue
        cmd = " ".join(row["command"] or ["?"])
        if len(cmd) > 60:
            cmd = cmd[:59] + "…"
        status = "running" if doc.get("ended_at") is None else str(row["exit_status"])
        denied = "-" if row["denied"] is None else str(row["denied"])
        flag = "" if row["enforced"] else "  (NOT enforced)"
        print(f"{row['sandbox_id']}  {row['started_at']}  exit {status:>7}  denied {denied:>4}  {cmd}{flag}")
    if shown == 0 and not args.json:
        print(f"no proofs in {proofs_dir}")
    return 0

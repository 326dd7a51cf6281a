"""`firma conformance --runner PATH [--json] [--evidence-dir DIR]`.

Runs the six invariant probes through the runner (plus a positive control for each directly on
the host), prints a table (or JSON) and exits 0 only when every invariant passed. Evidence files
are kept in the evidence directory (a fresh private temp directory unless one is given)."""

from __future__ import annotations

import json
import os
import tempfile

from .. import privfs
from ..runner.conformance.kit import run_conformance


def add_parser(sub):
    p = sub.add_parser("conformance", help="check a runner against the six launch-contract invariants")
    p.add_argument("--runner", required=True, metavar="PATH", help="runner executable to check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--evidence-dir",
        metavar="DIR",
        help="where to keep contracts and probe evidence (default: a new private temp directory)",
    )
    p.add_argument(
        "--probe-python",
        metavar="PATH",
        help="Python 3 interpreter the probes run with inside the runner (default: /usr/bin/python3)",
    )
    return p


def run(args) -> int:
    work = args.evidence_dir or tempfile.mkdtemp(prefix="firma-conformance-")
    if args.evidence_dir:
        # created privately, or an existing directory of the caller's with mode 0700 (§14)
        privfs.ensure_dir(os.path.abspath(work))
    report = run_conformance(args.runner, work, python=args.probe_python)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
    return 0 if report.ok else 1

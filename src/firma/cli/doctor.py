"""`firma doctor [--json]`: read-only preflight report; exit 0 with no FAIL, 1 with any FAIL."""

from __future__ import annotations

import os
import sys

from ..doctor import evaluate, exit_code, gather, report_json, report_text
from ..host import detect_host


def add_parser(sub):
    p = sub.add_parser("doctor", help="check whether this host can confine a run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _host_binaries(config: str | None) -> dict[str, str]:
    """`[host]` from trusted configuration, as `firma run` would use it; a config that cannot be
    read leaves the defaults (the config check reports why)."""
    from ..configfiles import load
    from ..errors import FirmaError

    try:
        return load(config, os.environ, os.getcwd()).host_binaries
    except (FirmaError, OSError):
        return {}


def run(args) -> int:
    host = detect_host(binaries=_host_binaries(getattr(args, "config", None)))
    checks = evaluate(host, gather(host, config_path=getattr(args, "config", None)))
    try:
        print(report_json(checks) if args.json else report_text(checks), flush=True)
    except BrokenPipeError:  # `firma doctor | head`: the verdict is still the exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return exit_code(checks)

"""`firma run [opts] -- CMD [ARGS…]`: parse, plan, then hand over to the lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from .core import config as cfgmod
from .core.planner import RunArgs, build_plan, plan_to_json
from .errors import ConfigError, PlanError
from .host import detect_host


def add_parser(sub):
    p = sub.add_parser(
        "run",
        help="run a command confined behind the policy sidecar",
        description="Run CMD in a sandbox whose only way out is the policy sidecar.",
        usage="firma run [options] -- CMD [ARGS...]",
    )
    p.add_argument("--profile", help="generic | claude-code (claude) | codex")
    p.add_argument("--backend", help="bwrap | vz | runner")
    p.add_argument("--identity-mode", help="sandbox-user | host-user")
    p.add_argument("--preserve-host-user", action="store_true", help="same as --identity-mode host-user")
    p.add_argument("--allow-host", action="append", default=[], metavar="PATTERN", help="allow HOST[:PORT] for this run (repeatable)")
    p.add_argument("--policy", metavar="FILE", help="Cedar policy file")
    p.add_argument("--sidecar", metavar="ENDPOINT", help="local | tcp://HOST:PORT | unix:///PATH")
    p.add_argument("--no-autostart", action="store_true", help="never start the embedded sidecar")
    p.add_argument("--sidecar-startup-timeout-secs", type=float, metavar="N")
    p.add_argument("--allow-non-structural", action="store_true")
    p.add_argument("--print-effective-config", action="store_true", help="print the resolved plan as JSON and exit")
    p.add_argument("--proof-file", metavar="PATH", help="also write the proof document here")
    p.add_argument("--monitor", action="store_true", help="observe only: log denies, let traffic pass")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return p


def _load_config(args, host, cwd: str) -> cfgmod.ConfigFile:
    env = host.environ
    path = cfgmod.discover(
        getattr(args, "config", None), env.get("FIRMA_CONFIG"), cwd, env.get("HOME"), os.path.isfile
    )
    if path is None:
        return cfgmod.EMPTY
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return cfgmod.parse(text, path)


def run(args) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise PlanError("no command given; usage: firma run [options] -- CMD [ARGS...]")
    host = detect_host()
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise PlanError(f"cannot read the working directory: {exc.strerror}") from None
    cfg = _load_config(args, host, cwd)
    run_args = RunArgs(
        command=tuple(cmd),
        profile=args.profile,
        backend=args.backend,
        identity_mode=args.identity_mode,
        preserve_host_user=args.preserve_host_user,
        allow_hosts=tuple(args.allow_host),
        policy=args.policy,
        sidecar=args.sidecar,
        no_autostart=args.no_autostart,
        startup_timeout_secs=args.sidecar_startup_timeout_secs,
        allow_non_structural=args.allow_non_structural,
        proof_file=args.proof_file,
        monitor=args.monitor,
    )
    plan = build_plan(
        run_args, cfg, host, cwd=cwd, unix_ms=time.time_ns() // 1_000_000, rand=os.urandom(20),
        realpath=os.path.realpath,
    )
    if args.print_effective_config:
        # Print and exit: nothing is started (the reference launched anyway).
        print(json.dumps(plan_to_json(plan), indent=2))
        return 0
    from .lifecycle import execute

    return asyncio.run(
        execute(
            plan,
            host,
            log_level=getattr(args, "log_filter", None),
            log_file=getattr(args, "log_file", None),
        )
    )

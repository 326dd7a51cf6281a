"""`firma run [opts] -- CMD [ARGS…]`: parse, plan, then hand over to the launch sequence."""

from __future__ import annotations

import json
import os
import sys
import time

from .main import APPEND, FLAG, VALUE, Opt, add_options
from ..core import config as cfgmod
from ..core.configtrust import notice
from ..core.planner import RunArgs, build_plan, plan_to_json
from ..errors import PlanError
from ..host import detect_host


# `run`'s options, described once: add_parser builds the argparse subparser from them and
# cli.fast_parse parses the plain forms of `firma run` with them, without argparse.
OPTIONS = (
    # Its own dest: argparse's subparser would reset a global `--config` given before `run`.
    Opt("--config", VALUE, "run_config", metavar="FILE", help="path to firma.toml (also accepted before `run`)"),
    Opt("--profile", VALUE, "profile", help="generic | claude-code (claude) | codex"),
    Opt("--backend", VALUE, "backend", help="bwrap | vz | runner"),
    Opt("--identity-mode", VALUE, "identity_mode", help="sandbox-user | host-user"),
    Opt("--preserve-host-user", FLAG, "preserve_host_user", help="same as --identity-mode host-user"),
    Opt("--allow-host", APPEND, "allow_host", metavar="PATTERN", help="allow HOST[:PORT] for this run (repeatable)"),
    Opt("--allow-tcp", APPEND, "allow_tcp", metavar="HOST:PORT",
        help="allow an opaque TCP destination (any protocol, not inspected; repeatable)"),
    Opt("--inspect", APPEND, "inspect", metavar="HOST",
        help="terminate HTTPS to HOST (or *.domain) and decide each request (repeatable)"),
    Opt("--policy", VALUE, "policy", metavar="FILE", help="Cedar policy file"),
    Opt("--sidecar", VALUE, "sidecar", metavar="ENDPOINT", help="local | tcp://HOST:PORT | unix:///PATH"),
    Opt("--no-autostart", FLAG, "no_autostart", help="never start the embedded sidecar"),
    Opt("--sidecar-startup-timeout-secs", VALUE, "sidecar_startup_timeout_secs", float, metavar="N"),
    Opt("--allow-non-structural", FLAG, "allow_non_structural"),
    Opt("--print-effective-config", FLAG, "print_effective_config", help="print the resolved plan as JSON and exit"),
    Opt("--proof-file", VALUE, "proof_file", metavar="PATH", help="also write the proof document here"),
    Opt("--monitor", FLAG, "monitor", help="observe only: log denies, let traffic pass"),
    Opt("--quiet", FLAG, "quiet", help="no run summary on stderr when the run ends"),
    Opt("--env", APPEND, "env", metavar="NAME[=VALUE]", help="pass NAME from your environment, or set it (repeatable)"),
    Opt("--mount", APPEND, "mount", metavar="SRC[:DST][:ro|rw]", help="bind a host path into the sandbox (repeatable; rw default)"),
    Opt("--allow-write", APPEND, "allow_write", metavar="PATH", help="make a host path writable inside, at the same place (repeatable)"),
    Opt("--publish", APPEND, "publish", metavar="[[BIND:]HOST_PORT:]PORT",
        help="make the agent's PORT inside reachable at 127.0.0.1:HOST_PORT on this host (repeatable)"),
    Opt("--cache", APPEND, "cache", metavar="NAME",
        help="keep this tool's cache between runs in this workspace: pip, uv, npm, cargo, go, maven, gradle (repeatable)"),
    Opt("--no-caches", FLAG, "no_caches", help="no kept caches for this run, whatever the configuration says"),
    Opt("--no-tty", FLAG, "no_tty", help="never give the agent a terminal of its own (pipes, as without a terminal)"),
    Opt("--read-only", FLAG, "read_only", help="the workspace is read-only inside (/tmp stays writable)"),
    Opt("--timeout", VALUE, "timeout", metavar="DURATION", help="stop the agent after this long (30s, 10m, 2h): SIGTERM, then SIGKILL; exit 124"),
    Opt("--memory", VALUE, "memory", metavar="SIZE", help="memory of the whole sandbox, e.g. 4g or 512m (default: half of RAM)"),
    Opt("--pids", VALUE, "pids", int, metavar="N", help="processes the sandbox may hold (default 4096)"),
    Opt("--cpus", VALUE, "cpus", metavar="N", help="CPUs the sandbox may use, e.g. 2 or 0.5 (default: not limited)"),
    Opt("--limits", VALUE, "limits_mode", metavar="MODE",
        help="strict (default): refuse a limit this host cannot enforce; best-effort: run and say so; off: no limits"),
    Opt("--summary-json", VALUE, "summary_json", metavar="FILE", help="write the run summary as JSON here"),
)


def add_parser(sub):
    p = sub.add_parser(
        "run",
        help="run a command confined behind the policy sidecar",
        description="Run CMD in a sandbox whose only way out is the policy sidecar.",
        usage="firma run [options] -- CMD [ARGS...]",
    )
    add_options(p, OPTIONS)
    p.add_argument("cmd", nargs="...", help="-- CMD [ARGS...]")  # argparse.REMAINDER
    return p


def _load_config(args, environ, cwd: str) -> cfgmod.ConfigSet:
    from ..configfiles import load

    explicit = getattr(args, "run_config", None) or getattr(args, "config", None)
    cfgs = load(explicit, environ, cwd)
    line = notice(cfgs.sources)
    if line is not None:
        print(f"[WARN] {line}", file=sys.stderr)
    return cfgs


def _foreground() -> bool:
    """firma is the terminal's foreground job (`firma run … &` is not: taking the terminal raw
    would stop it with SIGTTOU)."""
    try:
        return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def run(args) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise PlanError("no command given; usage: firma run [options] -- CMD [ARGS...]")
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise PlanError(f"cannot read the working directory: {exc.strerror}") from None
    cfg = _load_config(args, os.environ, cwd)
    host = detect_host(binaries=cfg.host_binaries)
    run_args = RunArgs(
        command=tuple(cmd),
        profile=args.profile,
        backend=args.backend,
        identity_mode=args.identity_mode,
        preserve_host_user=args.preserve_host_user,
        allow_hosts=tuple(args.allow_host),
        allow_tcp=tuple(args.allow_tcp),
        inspect=tuple(args.inspect or ()),
        policy=args.policy,
        sidecar=args.sidecar,
        no_autostart=args.no_autostart,
        startup_timeout_secs=args.sidecar_startup_timeout_secs,
        allow_non_structural=args.allow_non_structural,
        proof_file=args.proof_file,
        monitor=args.monitor,
        quiet=args.quiet,
        summary_json=args.summary_json,
        env=tuple(args.env or ()),
        mount=tuple(args.mount or ()),
        allow_write=tuple(args.allow_write or ()),
        read_only=args.read_only,
        timeout=args.timeout,
        publish=tuple(args.publish or ()),
        cache=tuple(args.cache or ()),
        no_caches=args.no_caches,
        # a terminal of the agent's own when firma's stdin and stdout are terminals (DESIGN §12a)
        terminal=not args.no_tty and os.isatty(0) and os.isatty(1) and _foreground(),
        memory=args.memory,
        pids=args.pids,
        cpus=args.cpus,
        limits_mode=args.limits_mode,
    )
    plan = build_plan(
        run_args, cfg, host, cwd=cwd, unix_ms=time.time_ns() // 1_000_000, rand=os.urandom(20),
        realpath=os.path.realpath,
    )
    if args.print_effective_config:
        # Print and exit: nothing is started (the reference launched anyway).
        print(json.dumps(plan_to_json(plan), indent=2))
        return 0
    from ..run.sequence import run as run_sequence

    return run_sequence(
        plan, host, log_level=getattr(args, "log_filter", None), log_file=getattr(args, "log_file", None)
    )

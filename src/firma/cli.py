"""Thin CLI: parse, call into the library, map FirmaError to one `[ERR]` line and exit 1.

Each command lives in its own `cli_<name>` module exposing `add_parser(subparsers)` and
`run(args) -> int`; this file only dispatches."""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from .errors import FirmaError

# command name -> module implementing add_parser/run
COMMANDS = {
    "run": "firma.cli_run",
    "sidecar": "firma.cli_sidecar",
    "doctor": "firma.cli_doctor",
    "audit": "firma.cli_audit",
    "contract": "firma.cli_contract",
    "conformance": "firma.cli_conformance",
}


_GLOBAL_WITH_VALUE = ("--config", "--log-file", "--log-filter")


def command_in(argv: list[str]) -> str | None:
    """The command name in argv (skipping global options), or None."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _GLOBAL_WITH_VALUE:
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            return a
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """`only`: import just that command's module (launch latency: `firma run` should not pay
    for every other command's imports). Unknown or None imports them all (help, errors)."""
    parser = argparse.ArgumentParser(
        prog="firma", description="Run AI agents confined behind a policy sidecar."
    )
    parser.add_argument("--config", help="path to firma.toml")
    parser.add_argument("--log-file", help="write firma's own log lines to this file")
    parser.add_argument("--log-filter", help="log level directive, e.g. info or debug")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    selected = {only: COMMANDS[only]} if only in COMMANDS else COMMANDS
    for name, modname in selected.items():
        mod = importlib.import_module(modname)
        p = mod.add_parser(sub)
        p.set_defaults(_module=mod)
    return parser


def entry() -> int:
    """The `firma` executable (console script and `python -m firma`): process-wide settings that a
    library caller of `main` should not inherit, then `main`.

    - firma never speaks TLS itself (SNI is read from raw bytes), so OpenSSL's Python modules are
      kept out of the process: asyncio imports `ssl` only if present, and hashlib serves the
      few SHA-256 digests firma computes from its builtin code without `_hashlib` (~9 ms of
      every launch together). cryptography (audit signatures) brings its own OpenSSL.
    - No garbage collection while starting: a launch allocates only long-lived objects (modules,
      the plan), and collecting during imports is ~5 ms; the lifecycle freezes the startup heap
      and re-enables collection once the agent runs (`lifecycle.startup_done`)."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]
    gc.disable()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(command_in(argv)).parse_args(argv)
        return int(args._module.run(args))
    except FirmaError as exc:
        print(f"[ERR]  {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        # The process exits right after main returns, and everything firma opened is closed by
        # then: freezing the heap spares the interpreter's final garbage collection over every
        # imported module (exit latency, ~15 ms of `firma run -- true`).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(entry())

"""Thin CLI: parse, call into the library, map FirmaError to one `[ERR]` line and exit 1.

Each command lives in its own `cli_<name>` module exposing `add_parser(subparsers)` and
`run(args) -> int`; this file only dispatches.

argparse is imported only when a parser is built: `firma run` in its plain forms is parsed by
`fast_parse` from the same option tables (building argparse's parser is ~6-8 ms of a launch:
every argument constructs a HelpFormatter, which imports shutil, and every message goes through
gettext). argparse stays the only source of help and error messages."""

from __future__ import annotations

import gc
import importlib
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.record import record
from ..errors import FirmaError

if TYPE_CHECKING:
    import argparse

# command name -> module implementing add_parser/run
COMMANDS = {
    "run": "firma.cli.run",
    "sidecar": "firma.cli.sidecar",
    "doctor": "firma.cli.doctor",
    "audit": "firma.cli.audit",
    "contract": "firma.cli.contract",
    "conformance": "firma.cli.conformance",
    "trust": "firma.cli.trust",
    "proofs": "firma.cli.proofs",
    "cache": "firma.cli.cache",
    "ca": "firma.cli.ca",
}

# Option kinds: FLAG is store_true, VALUE takes one value, APPEND takes one value per use.
FLAG, VALUE, APPEND = "flag", "value", "append"


@record
class Opt:
    """One long option, described once for argparse (`add_options`) and `fast_parse`."""

    name: str  # "--profile"
    kind: str  # FLAG | VALUE | APPEND
    dest: str
    type: type = str  # str or float (VALUE/APPEND)
    metavar: str | None = None
    help: str | None = None

    def default(self) -> Any:
        return False if self.kind == FLAG else [] if self.kind == APPEND else None


GLOBAL_OPTIONS = (
    Opt("--config", VALUE, "config", help="path to firma.toml"),
    Opt("--log-file", VALUE, "log_file", help="write firma's own log lines to this file"),
    Opt("--log-filter", VALUE, "log_filter", help="log level directive, e.g. info or debug"),
)
_GLOBAL_WITH_VALUE = tuple(o.name for o in GLOBAL_OPTIONS)


def add_options(parser: argparse.ArgumentParser, table: tuple[Opt, ...]) -> None:
    for o in table:
        kw: dict[str, Any] = {"dest": o.dest, "help": o.help}
        if o.kind == FLAG:
            kw["action"] = "store_true"
        else:
            if o.kind == APPEND:
                kw.update(action="append", default=[])
            if o.type is not str:
                kw["type"] = o.type
            if o.metavar is not None:
                kw["metavar"] = o.metavar
        parser.add_argument(o.name, **kw)


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
    import argparse

    parser = argparse.ArgumentParser(
        prog="firma", description="Run AI agents confined behind a policy sidecar."
    )
    add_options(parser, GLOBAL_OPTIONS)
    parser.add_argument("--version", action="version", version=f"firma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    selected = {only: COMMANDS[only]} if only in COMMANDS else COMMANDS
    for modname in selected.values():
        mod = importlib.import_module(modname)
        p = mod.add_parser(sub)
        p.set_defaults(_module=mod)
    return parser


def _take_options(argv: list[str], i: int, table: tuple[Opt, ...], out: dict[str, Any]) -> int | None:
    """Store the exact-name options from argv[i:] into `out`; the index of the first token that
    is `--` or not an option, or None for anything argparse might read otherwise."""
    by_name = {o.name: o for o in table}
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        name, eq, value = argv[i].partition("=")
        o = by_name.get(name)
        if o is None:  # -h, abbreviations, unknown options, `-1`
            return None
        i += 1
        if o.kind == FLAG:
            if eq:
                return None
            out[o.dest] = True
            continue
        if not eq:
            if i == len(argv):
                return None
            value = argv[i]
            i += 1
        # argparse reads a value starting with "-" as an option (an error), a negative number, or,
        # for `--opt=--`, an empty list: all left to it.
        if value.startswith("-"):
            return None
        try:
            v = o.type(value)
        except ValueError:
            return None
        if o.kind == APPEND:
            out[o.dest].append(v)
        else:
            out[o.dest] = v
    return i


def _ambiguous(token: str, table: tuple[Opt, ...]) -> bool:
    """argparse exits on a token abbreviating several of a parser's options (`--p`), even in a
    REMAINDER's span: every token before the first `--` is looked up, by both parsers."""
    if not token.startswith("--") or token == "--":
        return False
    prefix = token.partition("=")[0]
    names = ["-h", "--help", *(o.name for o in table)]
    return prefix not in names and sum(n.startswith(prefix) for n in names) > 1


def fast_parse(argv: list[str]) -> SimpleNamespace | None:
    """The namespace argparse would build for the plain forms of
    `firma [GLOBAL OPTIONS] run [RUN OPTIONS] [--] CMD…` (exact long names, `--opt value`,
    `--opt=value`), else None: argparse then parses argv as before (help, errors, abbreviations,
    other commands). No argparse import, no I/O besides importing the run module."""
    out = {o.dest: o.default() for o in GLOBAL_OPTIONS}
    i = _take_options(argv, 0, GLOBAL_OPTIONS, out)
    if i is None or i == len(argv) or argv[i] != "run":
        return None
    mod = importlib.import_module(COMMANDS["run"])
    out.update((o.dest, o.default()) for o in mod.OPTIONS)
    j = _take_options(argv, i + 1, mod.OPTIONS, out)
    if j is None:
        return None
    end = argv.index("--", i) if "--" in argv[i:] else len(argv)
    if any(_ambiguous(t, tb) for t in argv[i + 1 : end] for tb in (GLOBAL_OPTIONS, mod.OPTIONS)):
        return None
    # argparse's REMAINDER keeps a leading `--` (cli_run.run strips it).
    return SimpleNamespace(**out, command="run", cmd=argv[j:], _module=mod)


def _has_builtin_sha256() -> bool:
    for name in ("_sha2", "_sha256"):  # 3.12+, 3.11
        try:
            __import__(name)
            return True
        except ImportError:
            continue
    return False


def entry() -> int:
    """The `firma` executable (console script and `python -m firma`): process-wide settings that a
    library caller of `main` should not inherit, then `main`.

    - firma never speaks TLS itself (SNI is read from raw bytes), so OpenSSL's Python modules are
      kept out of the process: asyncio imports `ssl` only if present, and hashlib serves the
      few SHA-256 digests firma computes from its builtin code without `_hashlib` (~9 ms of
      every launch together). cryptography (audit signatures) brings its own OpenSSL.
    - No garbage collection while starting: a launch allocates only long-lived objects (modules,
      the plan), and collecting during imports is ~5 ms; the lifecycle freezes the startup heap
      and re-enables collection once the agent runs (`runparts.startup_done`)."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # None in sys.modules blocks an import
    if _has_builtin_sha256():  # some distributions build hashlib on OpenSSL only
        sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]  # None in sys.modules blocks an import
    gc.disable()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = fast_parse(argv) or build_parser(command_in(argv)).parse_args(argv)
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

"""`cli.fast_parse`: the argparse-free parse of plain `firma run …` command lines must give exactly
argparse's namespace, or None (argparse then parses, and stays the only source of help and usage
errors)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from linux_support import base_env

from firma import __version__ as FIRMA_VERSION
from firma.cli import main as cli
from firma.cli import run as cli_run

RUN_NAMES = [o.name for o in cli_run.OPTIONS]
GLOBAL_NAMES = [o.name for o in cli.GLOBAL_OPTIONS]
# Values and stray tokens, including the ones argparse reads specially: `--`, options as values,
# abbreviations (`--prof`; `--p`, `--log`, `--s` are ambiguous and make argparse exit even after a
# command), negative numbers, float edge cases, other commands, the empty string.
ODD = [
    "x", "1.5", "nan", "inf", " 2 ", "1_0", "-1", "-1.5", "--", "true", "-x", "-", "---", "--prof",
    "--p", "--log", "--log-fil", "--s", "--allow", "--=x", "--monitor=", "--pr=1", "-h", "--help",
    "--config", "run", "sidecar", "doctor", "", "a=b", "--bogus",
]
EQ_FORMS = [f"{n}={v}" for n in RUN_NAMES + GLOBAL_NAMES for v in ("x", "1.5", "nan", "", "-x", "--")]
TOKENS = st.sampled_from(RUN_NAMES + GLOBAL_NAMES + EQ_FORMS + ODD)
GLOBAL_TOKENS = st.sampled_from(GLOBAL_NAMES + [f"{n}=c" for n in GLOBAL_NAMES] + ["c", "-c", "--", "--log", "-h"])
GOOD_VALUES = ["x", "1.5", "nan", "inf", " 2 ", "", "run", "a=b", "true"]
BAD_VALUES = ["-1", "--", "-x", "--prof", "soon"]
FLAGS = {o.name for o in cli_run.OPTIONS if o.kind == cli.FLAG}


def _option(values: list[str]):
    """A long option with no value, a separate value or an `=value` (values drawn from `values`)."""
    v = st.sampled_from(values)
    return lambda name: st.one_of(st.just([name]), v.map(lambda x: [name, x]), v.map(lambda x: [f"{name}={x}"]))


def _well_formed(name: str):
    return st.just([name]) if name in FLAGS else _option(GOOD_VALUES)(name).filter(lambda a: a != [name])


def _argv(global_option, option, tail_token):
    """globals, `run`, run options, then the command part."""
    return st.builds(
        lambda g, o, r: [*sum(g, []), "run", *sum(o, []), *r],
        st.lists(global_option, max_size=3), st.lists(option, max_size=6), st.lists(tail_token, max_size=6),
    )


ARGVS = st.one_of(
    st.lists(TOKENS, max_size=8),
    _argv(  # anything in every place
        st.one_of(st.sampled_from(GLOBAL_NAMES).flatmap(_option(GOOD_VALUES + BAD_VALUES)), GLOBAL_TOKENS.map(lambda t: [t])),
        st.one_of(st.sampled_from(RUN_NAMES).flatmap(_option(GOOD_VALUES + BAD_VALUES)), TOKENS.map(lambda t: [t])),
        TOKENS,
    ),
    _argv(  # the forms the fast path takes, then any command part
        st.sampled_from(GLOBAL_NAMES).flatmap(_well_formed),
        st.sampled_from(RUN_NAMES).flatmap(_well_formed),
        st.one_of(st.just("--"), TOKENS),
    ),
)


def argparse_vars(argv: list[str]) -> dict | None:
    """What `cli.main` gets from argparse for argv (None: argparse exits)."""
    parser = cli.build_parser(cli.command_in(argv))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return vars(parser.parse_args(argv))
        except SystemExit:
            return None


def assert_same(fast: dict, slow: dict | None) -> None:
    assert slow is not None, "fast_parse accepted a command line argparse rejects"
    assert fast.keys() == slow.keys()
    assert fast["_module"] is slow["_module"] is cli_run
    for k, v in fast.items():
        w = slow[k]
        assert type(v) is type(w), k
        if isinstance(v, float) and v != v:  # nan: equal only to itself
            assert w != w, k
        elif k != "_module":
            assert v == w, k


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARGVS)
def test_fast_parse_agrees_with_argparse(argv):
    ns = cli.fast_parse(list(argv))
    if ns is not None:
        assert_same(vars(ns), argparse_vars(argv))


COMMON = [
    ["run", "--", "true"],
    ["run", "true"],
    ["run", "true", "x"],
    ["run", "true", "--profile", "x"],
    ["run", "cmd", "--y", "-z"],
    ["run", "--profile", "x", "--", "cmd", "--y"],
    ["run", "--monitor", "--print-effective-config", "--", "sh", "-c", "exit 3"],
    ["run"],
    ["run", "--"],
    ["--config=c.toml", "--log-file", "l", "run", "--profile=claude", "--", "claude", "--p"],
    ["--log-filter", "debug", "run", "--allow-host", "a:1", "--allow-host", "b:2",
     "--sidecar-startup-timeout-secs", "2.5", "--proof-file=p", "--", "cmd", "--x"],
]


def test_fast_parse_accepts_the_common_shapes():
    for argv in COMMON:
        ns = cli.fast_parse(argv)
        assert ns is not None, argv
        assert_same(vars(ns), argparse_vars(argv))
    ns = cli.fast_parse(COMMON[-1])
    assert ns.allow_host == ["a:1", "b:2"] and ns.sidecar_startup_timeout_secs == 2.5
    assert ns.cmd == ["--", "cmd", "--x"]  # REMAINDER keeps the `--`; cli_run.run strips it
    assert ns.log_filter == "debug" and ns.config is None and ns.command == "run"


def test_fast_parse_leaves_everything_else_to_argparse():
    for argv in (
        [], ["--help"], ["run", "--help"], ["run", "-h", "--", "true"], ["sidecar"],
        ["run", "--prof", "x", "--", "true"],  # abbreviation
        ["run", "--bogus", "--", "true"],
        ["run", "--profile"], ["run", "--profile", "--monitor"], ["run", "--profile", "--", "x"],
        ["run", "--sidecar-startup-timeout-secs", "soon", "--", "true"],
        ["run", "--monitor=1", "--", "true"],
        ["run", "--backend=--"], ["run", "--backend=-x"], ["run", "--profile", "-1"],
        ["run", "true", "--p"],  # ambiguous abbreviation after the command: argparse exits
        ["--log", "x", "run", "--", "true"], ["--", "run", "true"], ["-x", "run", "true"],
    ):
        assert cli.fast_parse(argv) is None, argv


def test_fast_parse_does_not_import_argparse(ws, tmp_path):
    code = (
        "import sys\n"
        "from firma.cli import main as cli\n"
        "ns = cli.fast_parse(['--log-filter', 'info', 'run', '--profile', 'generic', '--', 'true'])\n"
        "assert ns is not None\n"
        "print('argparse' in sys.modules)\n"
        # the whole plain `firma run` up to the plan (printed, nothing started)
        "rc = cli.main(['run', '--print-effective-config', '--', 'true'])\n"
        "print(rc, 'argparse' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ws, env=base_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "False" and lines[-1] == "0 False", p.stdout


def firma(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python -m firma ARGS` in an empty workspace (the state directory must lie outside it)."""
    return subprocess.run([sys.executable, "-m", "firma", *args], cwd=tmp_path / "ws", env=base_env(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_abbreviations_still_work_through_argparse(ws, tmp_path):
    argv = ["run", "--prof", "claude", "--print-eff", "--", "true"]
    assert cli.fast_parse(argv) is None
    p = firma(tmp_path, *argv)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["profile"] == "claude-code"
    assert not (tmp_path / "state").exists()  # nothing started


def test_unknown_option_is_argparses_usage_error(ws, tmp_path):
    p = firma(tmp_path, "run", "--bogus", "--", "true")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("usage: firma [-h]")
    assert p.stderr.endswith("firma: error: unrecognized arguments: --bogus\n")
    p = firma(tmp_path, "run", "--sidecar-startup-timeout-secs", "soon", "--", "true")
    assert p.returncode == 2
    assert "argument --sidecar-startup-timeout-secs: invalid float value: 'soon'" in p.stderr
    assert not (tmp_path / "state").exists()


def test_run_help_is_argparses_built_from_the_table(ws, tmp_path):
    p = firma(tmp_path, "run", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: firma run [options] -- CMD [ARGS...]\n")
    for o in cli_run.OPTIONS:
        assert o.name in p.stdout
        if o.help:
            assert o.help in " ".join(p.stdout.split()), o.name  # argparse rewraps help text
    top = firma(tmp_path, "--help")
    assert top.returncode == 0 and all(o.help in top.stdout for o in cli.GLOBAL_OPTIONS)


def test_version_and_config_after_run(ws, tmp_path):
    """`firma --version` prints the version; `--config FILE` works after `run` as before it, and
    after `run` it wins (the control: without it, no config file is used)."""
    v = subprocess.run([sys.executable, "-m", "firma", "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.strip() == f"firma {FIRMA_VERSION}", v.stdout + v.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nallow_hosts = ["from-config.example"]\n')
    other = tmp_path / "other.toml"
    other.write_text('[run]\nallow_hosts = ["from-other.example"]\n')

    def plan(*argv: str) -> dict:
        p = subprocess.run([sys.executable, "-m", "firma", *argv], cwd=ws, env=base_env(tmp_path),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    assert "from-config.example" not in json.dumps(plan("run", "--print-effective-config", "--", "true"))
    for argv in (("--config", str(cfg), "run"), ("run", "--config", str(cfg)), ("run", f"--config={cfg}")):
        assert "from-config.example" in json.dumps(plan(*argv, "--print-effective-config", "--", "true")), argv
    both = json.dumps(plan("--config", str(other), "run", "--config", str(cfg), "--print-effective-config", "--", "true"))
    assert "from-config.example" in both and "from-other.example" not in both

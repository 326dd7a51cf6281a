"""Where a credential's secret comes from (firma.credsource, DESIGN §5.7): an environment variable,
a private file, a command's stdout; each refusal one line naming the credential, none quoting the
secret. The tests run as root: ownership is tested by chowning to uid 65534."""

from __future__ import annotations

import os
import time

import pytest

from firma.core.credentials import CredentialError, parse_credentials
from firma.credsource import READ_LIMIT, read_secret

SECRET = "s3cretTOKENvalue"


def spec(source):
    (s,) = parse_credentials({"svc": {"hosts": ["api.example.com"], "env": "SVC_TOKEN", "source": source}}, "/cfg.toml")
    return s


def refused(source, *needles, environ=None, timeout=10.0):
    with pytest.raises(CredentialError) as info:
        read_secret(spec(source), environ or {}, timeout=timeout)
    msg = str(info.value)
    assert msg.startswith("[credentials.svc]") and "\n" not in msg, msg
    assert SECRET not in msg and SECRET not in repr(info.value), msg
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------------------ env


def test_env_source_reads_the_variable_and_strips_one_newline():
    assert read_secret(spec("env:FIRMA_SVC"), {"FIRMA_SVC": SECRET}) == SECRET.encode()
    assert read_secret(spec("env:FIRMA_SVC"), {"FIRMA_SVC": SECRET + "\n"}) == SECRET.encode()


def test_env_source_missing_empty_or_unsafe_is_refused():
    refused("env:FIRMA_SVC", "$FIRMA_SVC is not set or empty", environ={"OTHER": SECRET})
    refused("env:FIRMA_SVC", "$FIRMA_SVC", environ={"FIRMA_SVC": ""})
    refused("env:FIRMA_SVC", "line break", environ={"FIRMA_SVC": SECRET + "\r\nX-Evil: 1"})
    refused("env:FIRMA_SVC", "non-ASCII", environ={"FIRMA_SVC": SECRET + "é"})


# ------------------------------------------------------------------------------ file


@pytest.fixture
def secret_dir(tmp_path):
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


def put(d, content=SECRET + "\n", mode=0o600, name="token"):
    p = d / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(p, mode)
    return p


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_file_source_reads_a_private_file(secret_dir, mode):
    p = put(secret_dir, mode=mode)  # group-readable is accepted: a root-owned file shared with a group
    assert read_secret(spec(f"file:{p}"), {}) == SECRET.encode()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o444])
def test_file_source_refuses_a_world_readable_file(secret_dir, mode):
    p = put(secret_dir, mode=mode)
    refused(f"file:{p}", "chmod 600", str(p))


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_file_source_refuses_a_file_others_can_write(secret_dir, mode):
    p = put(secret_dir, mode=mode)
    refused(f"file:{p}", "writable by group or others")


def test_file_source_refuses_a_file_of_another_user(secret_dir):
    p = put(secret_dir)
    os.chown(p, 65534, 65534)
    refused(f"file:{p}", "owned by uid 65534")


def test_file_source_refuses_a_symlink_as_final_component(secret_dir):
    real = put(secret_dir)
    link = secret_dir / "link"
    link.symlink_to(real)
    refused(f"file:{link}", "symlink")


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o702])
def test_file_source_refuses_a_directory_others_can_write(secret_dir, dir_mode):
    p = put(secret_dir)
    os.chmod(secret_dir, dir_mode)
    refused(f"file:{p}", "writable by other users")


def test_file_source_refuses_a_sticky_shared_directory_as_direct_parent(secret_dir):
    p = put(secret_dir)
    os.chmod(secret_dir, 0o1777)  # like /tmp: another user could have planted the file
    refused(f"file:{p}", "writable by other users")


def test_file_source_refuses_an_ancestor_of_another_user(secret_dir):
    inner = secret_dir / "inner"
    inner.mkdir(mode=0o700)
    p = put(inner)
    os.chown(secret_dir, 65534, 65534)
    refused(f"file:{p}", "owned by uid 65534")


def test_file_source_missing_not_regular_too_large_or_unsafe(secret_dir):
    refused(f"file:{secret_dir}/absent", "does not exist")
    refused(f"file:{secret_dir}/nodir/token", "does not exist")
    os.mkfifo(secret_dir / "fifo", 0o600)
    refused(f"file:{secret_dir}/fifo", "not a regular file")
    (secret_dir / "adir").mkdir(mode=0o700)
    refused(f"file:{secret_dir}/adir", "not a regular file")
    big = put(secret_dir, "x" * (READ_LIMIT + 1), name="big")
    refused(f"file:{big}", "larger than")
    for content, name, why in (("", "empty", "empty"), (SECRET + "\0x", "nul", "NUL"), (SECRET + "\n\n", "two", "line break")):
        refused(f"file:{put(secret_dir, content, name=name)}", why)


# --------------------------------------------------------------------------- command


def test_command_source_captures_stdout():
    assert read_secret(spec(f"command:/bin/sh -c 'printf {SECRET}'"), {}) == SECRET.encode()
    assert read_secret(spec(f"command:/bin/sh -c 'echo {SECRET}'"), {}) == SECRET.encode()
    assert read_secret(spec("command:/bin/sh -c 'printf %s \"$1\"' sh 'arg with spaces'"), {}) == b"arg with spaces"


def test_command_source_runs_in_a_small_environment_at_root_with_no_stdin():
    environ = {"HOME": "/home/u", "LD_PRELOAD": "/evil.so", "FIRMA_OTHER_SECRET": "x", "PATH": "/opt/evil/bin", "USER": "u"}
    script = "printf %s \"$PATH|$HOME|$USER|${LD_PRELOAD-unset}|${FIRMA_OTHER_SECRET-unset}|$(pwd)|\"; cat"
    got = read_secret(spec(f"command:/bin/sh -c '{script}'"), environ)
    assert got == b"/usr/bin:/bin|/home/u|u|unset|unset|/|"


def test_command_source_nonzero_exit_names_the_status_and_stderr_but_not_stdout():
    msg = refused(f"command:/bin/sh -c 'printf {SECRET}; echo \"vault locked\" >&2; exit 3'", "exited with status 3",
                  "vault locked")
    assert "/bin/sh" in msg
    msg = refused(f"command:/bin/sh -c 'printf {SECRET}; echo \"bad token {SECRET}\" >&2; exit 1'", "bad token [output]")


def test_command_source_killed_by_a_signal():
    refused("command:/bin/sh -c 'kill -9 $$'", "killed by signal 9")


def test_command_source_timeout_and_a_command_that_closes_its_pipes_and_lingers():
    t0 = time.monotonic()
    refused("command:/bin/sh -c 'sleep 20'", "did not finish within 0.5 s", timeout=0.5)
    refused("command:/bin/sh -c 'exec >&- 2>&-; sleep 20'", "did not finish", timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_command_source_does_not_wait_for_or_leave_a_background_child(tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    got = read_secret(spec(f"command:/bin/sh -c 'sleep 30 & echo $! > {pidfile}; printf {SECRET}'"), {})
    assert got == SECRET.encode() and time.monotonic() - t0 < 5
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the helper's background child is still running")


def test_command_source_output_too_large_empty_or_unsafe():
    refused(f"command:/bin/sh -c 'head -c {READ_LIMIT + 1} /dev/zero | tr \"\\\\0\" x'", "more than")
    refused("command:/bin/sh -c 'true'", "empty")
    refused(f"command:/bin/sh -c 'printf \"{SECRET}\\\\001x\"'", "control character")


def test_command_source_program_that_cannot_run():
    refused("command:/nonexistent/helper --get", "cannot run /nonexistent/helper")

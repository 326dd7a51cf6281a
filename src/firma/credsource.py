"""Where a credential's secret comes from (DESIGN §5.7): read by the launcher on the host,
before the sandbox exists, from an environment variable, a private file, or a command's standard
output. Every secret passes core.credentials.validate_secret; no error ever carries it (a
command's output is never quoted; its stderr line is, with the output cut out of it)."""

from __future__ import annotations

import os
import selectors
import signal
import stat
import subprocess
import time
from typing import Mapping

from . import privfs
from .core.credentials import MAX_SECRET, CredentialError, CredentialSpec, validate_secret

READ_LIMIT = MAX_SECRET + 2  # the longest secret with a trailing "\r\n"; more is refused
STDERR_KEEP = 4096
# A credential helper's environment: a fixed PATH and what locates the user's keyring or agent;
# nothing that changes what it loads (LD_*, PYTHON*), and none of the launcher's other secrets.
COMMAND_PATH = "/usr/bin:/bin"
COMMAND_ENV_PASSED = ("HOME", "USER", "LOGNAME", "LANG", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")


def read_secret(spec: CredentialSpec, environ: Mapping[str, str], *, timeout: float = 10.0) -> bytes:
    """The secret of `spec` from its source, validated."""
    if spec.source_kind == "env":
        raw = _from_env(spec, environ)
    elif spec.source_kind == "file":
        raw = _from_file(spec)
    elif spec.source_kind == "command":
        raw = _from_command(spec, environ, timeout)
    else:
        raise CredentialError(f"[credentials.{spec.name}]: unknown source kind {spec.source_kind!r}; use env:, file: or command:")
    return validate_secret(raw, spec.name)


def _where(spec: CredentialSpec) -> str:
    return f"[credentials.{spec.name}]"


def _from_env(spec: CredentialSpec, environ: Mapping[str, str]) -> bytes:
    name = str(spec.source_arg)
    value = environ.get(name, "")
    if not value:
        raise CredentialError(f"{_where(spec)}: ${name} is not set or empty; export it before `firma run` or change source")
    return value.encode("utf-8", "surrogateescape")  # the bytes the variable held (os.environ's decoding)


def _from_file(spec: CredentialSpec) -> bytes:
    path = str(spec.source_arg)
    where = _where(spec)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):  # a clear message; O_NOFOLLOW below enforces it
            raise CredentialError(f"{where}: secret file {path} is a symlink, which firma never follows; point source at the file itself")
        data, mode = privfs.read_private(path, READ_LIMIT, what="secret file")
    except FileNotFoundError:
        raise CredentialError(f"{where}: secret file {path} does not exist; create it (chmod 600) or fix source") from None
    except privfs.PrivatePathError as exc:
        raise CredentialError(f"{where}: {exc}") from None
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read secret file {path}: {exc.strerror}; fix source") from None
    if not stat.S_ISREG(mode):
        raise CredentialError(f"{where}: secret file {path} is not a regular file; point source at a file")
    if mode & 0o004:
        raise CredentialError(f"{where}: secret file {path} is readable by every user (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    return data


def _from_command(spec: CredentialSpec, environ: Mapping[str, str], timeout: float) -> bytes:
    argv = list(spec.source_arg) if isinstance(spec.source_arg, tuple) else [spec.source_arg]
    where, prog = _where(spec), argv[0]
    env = {"PATH": COMMAND_PATH} | {k: environ[k] for k in COMMAND_ENV_PASSED if k in environ}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd="/", close_fds=True, start_new_session=True)
    except OSError as exc:
        raise CredentialError(f"{where}: cannot run {prog}: {exc.strerror}; fix source") from None
    try:
        out, err, why = _collect(proc, timeout)
        if why == "timeout":
            raise CredentialError(f"{where}: {prog} did not finish within {timeout:g} s; fix the command or raise its timeout")
        if why == "too_much":
            raise CredentialError(f"{where}: {prog} printed more than {READ_LIMIT} bytes; it must print only the secret")
        status = proc.returncode
    finally:
        # Whatever the helper left running in its session (a daemon that detached has its own).
        _kill_group(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        line = _first_line(err, out)
        raise CredentialError(f"{where}: {prog} {how}{': ' + line if line else ''}; fix the command "
                              "(it must print the secret on stdout and exit 0)")
    return out


def _collect(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes, str]:
    """stdout (capped) and the start of stderr until both close, or until the command has exited
    and nothing is left to read (a background child may hold the pipes open); "timeout" or
    "too_much" in place of "" when the command is stopped."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc)
                return b"", b"", "timeout"
            events = sel.select(min(left, 0.1))
            if not events and proc.poll() is not None:
                break  # exited, and everything it wrote before exiting has been read
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                if buf is out:
                    out += data
                    if len(out) > READ_LIMIT:
                        _kill_group(proc)
                        return b"", b"", "too_much"
                elif len(err) < STDERR_KEEP:
                    err += data[: STDERR_KEEP - len(err)]
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))  # it may have closed its pipes and gone on
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return b"", b"", "timeout"
    return bytes(out), bytes(err), ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the helper and what it started
    except ProcessLookupError:
        pass
    except PermissionError:  # a set-uid helper: only the child itself, if at all
        try:
            proc.kill()
        except OSError:
            pass
    proc.wait()


def _first_line(err: bytes, out: bytes) -> str:
    """The first non-blank line of stderr, printable and short, with the output cut out of it
    (a failing helper may echo what it printed)."""
    line = next((ln for ln in err.splitlines() if ln.strip()), b"")
    secret = out.strip()
    if secret:
        line = line.replace(secret, b"[output]")
    text = line.decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()[:200]


__all__ = ["read_secret", "READ_LIMIT"]

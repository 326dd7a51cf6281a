"""The audit files on disk: the signing key and the log (no asyncio: the synchronous launcher
checks both before the services start, DESIGN §9 readiness)."""

from __future__ import annotations

import contextlib
import os
import stat

from .. import privfs
from ..core import auditfmt
from ..errors import AuditError
from ..privfs import PrivatePathError, private_temp

_KEY_MAX = 64 * 1024  # a P-256 PEM key is a few hundred bytes


def load_or_create_key(path: str):
    """The signing key at path (PEM PKCS#8, P-256), created 0600 when absent.

    A new key is written to a private temp file and linked into place, so a concurrent launcher
    sharing the state dir sees either no key or a complete one, never a half-written file."""
    key = _load_key(path)
    if key is not None:
        return key
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = private_temp(directory, ".audit.key.", "")
    except OSError as exc:
        raise AuditError(f"cannot create audit key {path}: {exc.strerror}; fix the state directory permissions") from None
    try:
        with os.fdopen(fd, "wb") as f:
            key = auditfmt.generate_key()
            f.write(auditfmt.key_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return key
    except FileExistsError:
        pass  # a concurrent launcher linked its key first: use that one
    except OSError as exc:
        raise AuditError(f"cannot create audit key {path}: {exc.strerror}; fix the state directory permissions") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    key = _load_key(path)
    if key is None:
        raise AuditError(f"audit key {path} vanished while it was being created; retry")
    return key


def _load_key(path: str):
    """The existing key at path, None when there is none; refuses links and loose modes."""
    pem = read_key_file(path)
    return None if pem is None else parse_key(pem, path)


def parse_key(pem: bytes, path: str):
    try:
        return auditfmt.load_private_pem(pem)
    except ValueError as exc:
        raise AuditError(f"cannot load audit key {path}: {exc}; remove it to generate a new one") from None


def read_key_file(path: str) -> bytes | None:
    """The key file's bytes, None when there is none (firma.privfs `read_private`: no link, owned
    by the caller or root); a mode readable by group or others is refused."""
    try:
        pem, mode = privfs.read_private(path, _KEY_MAX, what="audit key")
    except FileNotFoundError:
        return None
    except PrivatePathError as exc:
        raise AuditError(f"cannot load audit key: {exc}; remove it to generate a new one") from None
    if not stat.S_ISREG(mode):
        raise AuditError(f"audit key {path} is not a regular file; remove it")
    if mode & 0o077:
        raise AuditError(f"audit key {path} is readable by group/others (mode {mode & 0o777:o}); chmod 600 it")
    # The armour is checked here so a wrong file fails at once; the key type when it is parsed.
    if not pem.lstrip().startswith(b"-----BEGIN PRIVATE KEY-----") or b"-----END PRIVATE KEY-----" not in pem:
        raise AuditError(f"cannot load audit key {path}: not a PEM PKCS#8 private key; remove it to generate a new one")
    return pem


def open_audit_log(path: str, remedy: str = "fix --audit or its directory") -> int:
    """A descriptor appending to the audit log (firma.privfs `open_append`: created 0600, a looser
    mode of the caller's own file tightened, a link or another user's file refused)."""
    try:
        return privfs.open_append(path)
    except PrivatePathError as exc:
        raise AuditError(f"cannot open audit log: {exc}; {remedy}") from None
    except OSError as exc:
        raise AuditError(f"cannot open audit log {path}: {exc.strerror}; {remedy}") from None


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding `path` (a directory)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

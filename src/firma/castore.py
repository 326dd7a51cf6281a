"""firma's HTTPS inspection CA on the host (DESIGN §5.7): one per user in the state root's `ca/`,
created on first use, replaced by `firma ca rotate`; and the trust files the sandbox mounts.

The launcher imports this module, and the launcher never imports `ssl` (cli.main.entry): only
`cryptography`, and only inside the functions that need it (its x509 import alone costs a launch
~100 ms, and `firma.host` imports this module for `system_bundle_path`).

The key and the certificate are two files: a rotation holds `ca/.lock` alone while it renames
both into place, and readers share it, so no reader pairs a new key with an old certificate. A
pair that still does not match (a crash between the two renames) is refused with the fix."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import warnings
from typing import TYPE_CHECKING, Callable, Iterator

from . import privfs
from .core import statelayout
from .core.record import record
from .errors import CaError

if TYPE_CHECKING:
    from datetime import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

SYSTEM_BUNDLE_CANDIDATES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, the BSDs
)
JAVA_TRUSTSTORE_PASSWORD = "changeit"  # the JDK's well-known default: a trust store holds only public certificates
CA_NAME_PREFIX = "firma local inspection CA"
CA_VALIDITY_DAYS = 3652  # ten years
CA_BACKDATE_SECS = 3600  # clocks a little behind the host's still accept it
_MAX_PEM = 64 * 1024  # a P-256 key or one certificate is well under 2 KiB
_TEMP_PREFIX = ".ca-new-"  # what a crashed rotation leaves: removed by the next one


@record
class CaInfo:
    key_path: str
    cert_path: str
    cert_pem: bytes
    fingerprint_sha256: str  # hex of the certificate's DER, lowercase, no colons
    subject: str  # RFC 4514
    not_before: str  # ISO 8601 UTC, e.g. 2026-01-02T03:04:05Z
    not_after: str


@record
class CaPair:
    """A CA key and the certificate it matches (the services process signs leaves with it)."""

    key: EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_pem: bytes


# ---- the store ---------------------------------------------------------------------------------


def load(state_root: str) -> CaInfo | None:
    """The CA of `state_root`, None when none was made yet. Nothing is created."""
    ca_dir = statelayout.ca_dir_path(state_root)
    if not os.path.lexists(ca_dir):
        return None
    _private_dir(ca_dir)  # an existing directory is only checked
    key_path, cert_path = statelayout.ca_key_path(state_root), statelayout.ca_cert_path(state_root)
    with _lock(ca_dir, exclusive=False):
        pair = _read_pair(key_path, cert_path)
    return None if pair is None else _info(key_path, cert_path, pair)


def load_or_create(state_root: str) -> CaInfo:
    """The CA of `state_root`, made (with the state root, privately) when there is none yet."""
    ca_dir = _ensure_ca_dir(state_root)
    key_path, cert_path = statelayout.ca_key_path(state_root), statelayout.ca_cert_path(state_root)
    with _lock(ca_dir, exclusive=True):
        pair = _read_pair(key_path, cert_path)
        if pair is None:
            pair = _replace_pair(ca_dir, key_path, cert_path)
    from datetime import datetime, timezone  # noqa: PLC0415 - with the CA only

    if pair.cert.not_valid_after_utc <= datetime.now(timezone.utc):
        raise CaError(f"firma's CA {cert_path} expired on {_iso(pair.cert.not_valid_after_utc)}; run `firma ca rotate`")
    return _info(key_path, cert_path, pair)


def rotate(state_root: str) -> CaInfo:
    """A new CA replacing the old one (or the first one): the old pair is not read, so a broken
    one is replaced too."""
    ca_dir = _ensure_ca_dir(state_root)
    key_path, cert_path = statelayout.ca_key_path(state_root), statelayout.ca_cert_path(state_root)
    with _lock(ca_dir, exclusive=True):
        pair = _replace_pair(ca_dir, key_path, cert_path)
    return _info(key_path, cert_path, pair)


def load_pair(key_path: str, cert_path: str) -> CaPair:
    """The CA key and certificate at these paths, checked as `load` checks them (for the services
    process, which is given the paths)."""
    ca_dir = os.path.dirname(os.path.abspath(cert_path))
    with _lock(ca_dir, exclusive=False):
        pair = _read_pair(key_path, cert_path)
    if pair is None:
        raise CaError(f"firma's CA is missing ({key_path}, {cert_path}); run `firma ca rotate` to make one")
    return pair


def _ensure_ca_dir(state_root: str) -> str:
    _private_dir(state_root)
    ca_dir = statelayout.ca_dir_path(state_root)
    _private_dir(ca_dir)
    return ca_dir


def _private_dir(path: str) -> None:
    try:
        privfs.ensure_dir(path)
    except privfs.PrivatePathError as exc:
        raise CaError(f"firma's CA directory: {exc}") from None


@contextlib.contextmanager
def _lock(ca_dir: str, *, exclusive: bool) -> Iterator[None]:
    """`ca/.lock` held shared (readers) or alone (writers). A reader finding no lock file reads
    without one: every writer creates it before the first pair exists."""
    path = statelayout.ca_lock_beside(os.path.join(ca_dir, statelayout.CA_CERT))
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if exclusive else 0)
    fd = -1
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CaError(f"cannot open the CA lock {path}: {exc.strerror}; remove it") from None
    if fd < 0:
        yield
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise CaError(f"the CA lock {path} is not a regular file of yours; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_pair(key_path: str, cert_path: str) -> CaPair | None:
    key_pem = _read_key_file(key_path)
    cert_pem = _read_cert_file(cert_path)
    if key_pem is None and cert_pem is None:
        return None
    if key_pem is None or cert_pem is None:
        have, missing = (cert_path, key_path) if key_pem is None else (key_path, cert_path)
        raise CaError(f"firma's CA is incomplete: {have} exists without {missing}; run `firma ca rotate` to make a new CA")
    return _parse_pair(key_pem, cert_pem, key_path, cert_path)


def _read_key_file(path: str) -> bytes | None:
    """The key's bytes, None when absent. Refused: a symlink, a file not the caller's, a mode
    readable by group or others (the key signs certificates the sandbox trusts)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CaError(f"cannot inspect the CA key {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CaError(f"the CA key {path} is a symlink; firma never follows one there: remove it and run `firma ca rotate`")
    if st.st_uid != os.geteuid():
        raise CaError(f"the CA key {path} is owned by uid {st.st_uid}, not you; remove it and run `firma ca rotate`")
    if st.st_mode & 0o077:
        raise CaError(f"the CA key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                      "run `firma ca rotate` (and chmod 600 any copy)")
    try:
        data, mode = privfs.read_private(path, _MAX_PEM, what="CA key")
    except FileNotFoundError:
        return None
    except privfs.PrivatePathError as exc:
        raise CaError(f"{exc}; run `firma ca rotate`") from None
    if not stat.S_ISREG(mode) or mode & 0o077:  # the file opened, as it is now
        raise CaError(f"the CA key {path} changed while being read (mode {stat.S_IMODE(mode):04o}); run `firma ca rotate`")
    return data


def _read_cert_file(path: str) -> bytes | None:
    try:
        data, mode = privfs.read_private(path, _MAX_PEM, what="CA certificate")
    except FileNotFoundError:
        return None
    except privfs.PrivatePathError as exc:
        raise CaError(f"{exc}; run `firma ca rotate`") from None
    if not stat.S_ISREG(mode):
        raise CaError(f"the CA certificate {path} is not a regular file; remove it and run `firma ca rotate`")
    return data


def _parse_pair(key_pem: bytes, cert_pem: bytes, key_path: str, cert_path: str) -> CaPair:
    from cryptography import x509  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - with the CA only

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"cannot load the CA key {key_path}: {exc}; run `firma ca rotate`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"the CA key {key_path} is not an ECDSA key; run `firma ca rotate`")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CaError(f"cannot load the CA certificate {cert_path}: {exc}; run `firma ca rotate`") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CaError(f"the CA key {key_path} does not match the certificate {cert_path}; run `firma ca rotate`")
    return CaPair(key=key, cert=cert, cert_pem=cert_pem)


def _replace_pair(ca_dir: str, key_path: str, cert_path: str) -> CaPair:
    """A new key and certificate, both written under temporary names, then renamed into place
    (key first); the caller holds the lock alone."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - with the CA only

    _remove_leftovers(ca_dir)
    key, cert = _new_ca()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    temps: list[str] = []
    try:
        for data in (key_pem, cert_pem):
            temps.append(_write_temp(ca_dir, data))
        os.replace(temps[0], key_path)
        os.replace(temps[1], cert_path)
        temps.clear()
    except OSError as exc:
        raise CaError(f"cannot write firma's CA in {ca_dir}: {exc.strerror}; fix the state directory") from None
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return CaPair(key=key, cert=cert, cert_pem=cert_pem)


def _write_temp(directory: str, data: bytes) -> str:
    fd, path = privfs.private_temp(directory, _TEMP_PREFIX, "")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def _remove_leftovers(ca_dir: str) -> None:
    for entry in os.scandir(ca_dir):
        if entry.name.startswith(_TEMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _new_ca() -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    from datetime import datetime, timedelta, timezone  # noqa: PLC0415 - with the CA only

    from cryptography import x509  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - with the CA only
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 - with the CA only

    key = ec.generate_private_key(ec.SECP256R1())
    # The random part tells one user's (or one rotation's) CA from another in trust-store listings.
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME_PREFIX} {os.urandom(4).hex()}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "firma"),
    ])
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=CA_BACKDATE_SECS))
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(ski, critical=False)
        # Strict verifiers (Python 3.13's default) want it; for a root it names the root's own key.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _info(key_path: str, cert_path: str, pair: CaPair) -> CaInfo:
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - with the CA only

    return CaInfo(
        key_path=key_path,
        cert_path=cert_path,
        cert_pem=pair.cert_pem,
        fingerprint_sha256=pair.cert.fingerprint(hashes.SHA256()).hex(),
        subject=pair.cert.subject.rfc4514_string(),
        not_before=_iso(pair.cert.not_valid_before_utc),
        not_after=_iso(pair.cert.not_valid_after_utc),
    )


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- trust files for the sandbox (pure) --------------------------------------------------------


def trust_bundle(system_bundle: bytes, ca_pem: bytes) -> bytes:
    """The CAs the sandbox trusts: the host's bundle, then firma's CA."""
    return system_bundle + b"\n" + ca_pem


def java_truststore(bundle_pem: bytes) -> bytes:
    """A PKCS#12 trust store (password JAVA_TRUSTSTORE_PASSWORD) of every certificate in
    `bundle_pem` that cryptography can parse; duplicates once. Java reads no PEM bundle."""
    from cryptography import x509  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 - with the CA only
    from cryptography.hazmat.primitives.serialization import pkcs12  # noqa: PLC0415 - with the CA only
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 - with the CA only

    entries: list[pkcs12.PKCS12Certificate] = []
    seen: set[bytes] = set()
    aliases: set[str] = set()
    for block in _pem_certificates(bundle_pem):
        try:
            with warnings.catch_warnings():  # old roots with a negative serial: accepted, no noise
                warnings.simplefilter("ignore")
                cert = x509.load_pem_x509_certificate(block)
            fingerprint = cert.fingerprint(hashes.SHA256())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            alias = str(names[0].value) if names else cert.subject.rfc4514_string()
        except ValueError:
            continue  # a certificate cryptography rejects (some old roots): Java does without it
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        # Java lowercases aliases; two CAs with one name keep both.
        if alias.lower() in aliases or not alias:
            alias = f"{alias} [{fingerprint.hex()[:16]}]"
        aliases.add(alias.lower())
        entries.append(pkcs12.PKCS12Certificate(cert, alias.encode("utf-8")))
    return pkcs12.serialize_java_truststore(
        entries, serialization.BestAvailableEncryption(JAVA_TRUSTSTORE_PASSWORD.encode()))


def _pem_certificates(bundle_pem: bytes) -> Iterator[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    at = bundle_pem.find(begin)
    while at >= 0:
        stop = bundle_pem.find(end, at)
        if stop < 0:
            return
        yield bundle_pem[at : stop + len(end)] + b"\n"
        at = bundle_pem.find(begin, stop)


def system_bundle_path(exists: Callable[[str], bool]) -> str | None:
    """The host's CA bundle: the first of SYSTEM_BUNDLE_CANDIDATES that `exists`."""
    return next((p for p in SYSTEM_BUNDLE_CANDIDATES if exists(p)), None)

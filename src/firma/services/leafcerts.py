"""Leaf certificates for inspected connections (DESIGN §5.7): per destination name, a fresh
ECDSA P-256 key and a short-lived certificate signed by firma's CA, served from an
`ssl.SSLContext` that is cached per name.

Python's `ssl` loads a certificate and its key only from files: each leaf is written to two new
0600 files in the run's private directory, loaded, and unlinked at once, so the key lives on
only inside the context. `context_for` runs in executor threads: the cache is guarded by a lock."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import castore, privfs
from ..errors import CaError

ALPN = ["http/1.1"]  # h2 is not inspected: a client offering it falls back to HTTP/1.1
BACKDATE_SECS = 300  # an agent's clock a little behind the host's still accepts the leaf
REMINT_MARGIN_SECS = 600  # a cached leaf this close to expiry is replaced
_CN_MAX = 64  # X.520 ub-common-name: longer names go in subjectAltName only


class LeafMint:
    """Server contexts carrying leaves of the CA at `ca_key_path`/`ca_cert_path` (loaded once,
    here). `private_dir`: a 0700 directory of the caller's where leaf files briefly exist."""

    def __init__(self, ca_key_path: str, ca_cert_path: str, private_dir: str, *,
                 lifetime_secs: int = 86400, max_cached: int = 512) -> None:
        if lifetime_secs <= REMINT_MARGIN_SECS:
            raise ValueError(f"lifetime_secs must exceed {REMINT_MARGIN_SECS}, the re-mint margin")
        pair = castore.load_pair(ca_key_path, ca_cert_path)
        if pair.cert.not_valid_after_utc <= datetime.now(timezone.utc):
            raise CaError(f"firma's CA {ca_cert_path} has expired; run `firma ca rotate`")
        try:
            privfs.ensure_dir(private_dir)
        except privfs.PrivatePathError as exc:
            raise CaError(f"the leaf certificates' directory: {exc}") from None
        self._ca_key = pair.key
        self._ca_cert = pair.cert
        self._ca_pem = pair.cert_pem
        self._aki = _authority_key_id(pair.cert)
        self._private_dir = private_dir
        self._lifetime = timedelta(seconds=lifetime_secs)
        self._max_cached = max(1, max_cached)
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()  # name -> (context, expiry epoch)
        self._lock = threading.Lock()

    def context_for(self, name: str) -> ssl.SSLContext:
        """A TLS 1.2+ server context presenting a leaf for `name` (a DNS name in A-label form,
        or an IPv4/IPv6 literal), offering ALPN http/1.1 only."""
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[1] - REMINT_MARGIN_SECS > time.time():
                self._cache.move_to_end(name)
                return cached[0]
        context, expires = self._mint(name)  # outside the lock: two threads may mint one name, once each
        with self._lock:
            self._cache[name] = (context, expires)
            self._cache.move_to_end(name)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return context

    def _mint(self, name: str) -> tuple[ssl.SSLContext, float]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf_cert(name, key)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain_pem = cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(ALPN)
        paths: list[str] = []
        try:
            key_file = self._write(key_pem, ".key")
            paths.append(key_file)
            chain_file = self._write(chain_pem, ".pem")
            paths.append(chain_file)
            context.load_cert_chain(chain_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CaError(f"cannot load a leaf certificate for {name} from {self._private_dir}: {exc}; "
                          "check that directory") from None
        finally:
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return context, cert.not_valid_after_utc.timestamp()

    def _write(self, data: bytes, suffix: str) -> str:
        fd, path = privfs.private_temp(self._private_dir, "leaf-", suffix)  # 0600, O_EXCL, random name
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path

    def _leaf_cert(self, name: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        alt_name = _alt_name(name)
        # A name too long for a CN leaves the subject empty: then the SAN must be critical (RFC 5280).
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= _CN_MAX else [])
        now = datetime.now(timezone.utc)
        not_after = min(now + self._lifetime, self._ca_cert.not_valid_after_utc)  # never outlive the CA
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=BACKDATE_SECS))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([alt_name]), critical=not len(subject))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )


def _alt_name(name: str) -> x509.GeneralName:
    """iPAddress for an IP literal (brackets allowed around IPv6), else dNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    except ValueError:
        pass
    if not name or not name.isascii():
        raise CaError(f"cannot make a leaf certificate for {name!r}: not an IP literal or an A-label host name; this is a bug")
    return x509.DNSName(name)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The CA's own subjectKeyIdentifier when it has one (verifiers match the two), else one
    derived from its key."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

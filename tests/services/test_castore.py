"""firma's inspection CA on the host (firma.castore): created privately on first use, refused when
its key is a link, loose or another user's, or does not match its certificate; rotated as a pair
that readers never see half-replaced; the trust bundle and the Java trust store (checked with the
real keytool); and the module never brings `ssl` into the launcher."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firma import castore
from firma.core import statelayout
from firma.errors import CaError


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "state")  # does not exist yet


def test_first_use_creates_the_state_root_and_a_private_ca(root):
    assert castore.load(root) is None
    assert not os.path.exists(root)  # load creates nothing
    info = castore.load_or_create(root)
    assert info.key_path == statelayout.ca_key_path(root) == os.path.join(root, "ca", "ca.key")
    assert info.cert_path == statelayout.ca_cert_path(root) == os.path.join(root, "ca", "ca.pem")
    assert mode(root) == 0o700 and mode(os.path.join(root, "ca")) == 0o700
    assert mode(info.key_path) == 0o600 and mode(info.cert_path) == 0o600
    assert sorted(os.listdir(os.path.join(root, "ca"))) == [".lock", "ca.key", "ca.pem"]  # no temp files left
    with open(info.cert_path, "rb") as f:
        assert f.read() == info.cert_pem
    with open(info.key_path, "rb") as f:
        key_pem = f.read()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    # The same CA on every later use, whichever way it is read.
    assert castore.load_or_create(root) == info
    assert castore.load(root) == info


def test_the_ca_certificate_is_what_the_design_names(root):
    info = castore.load_or_create(root)
    cert = x509.load_pem_x509_certificate(info.cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert info.fingerprint_sha256 == hashlib.sha256(der).hexdigest()
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert str(cn).startswith("firma local inspection CA ") and len(str(cn)) > len("firma local inspection CA ") + 4
    assert cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == "firma"
    assert cert.issuer == cert.subject and info.subject == cert.subject.rfc4514_string()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    cert.verify_directly_issued_by(cert)  # self-signed
    now = datetime.now(timezone.utc)
    back = now - cert.not_valid_before_utc
    assert timedelta(minutes=59) <= back <= timedelta(minutes=61)
    assert timedelta(days=3650) <= cert.not_valid_after_utc - now <= timedelta(days=3653)
    assert info.not_before == cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert info.not_after == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_rotate_replaces_the_pair_with_a_matching_new_one(root):
    old = castore.load_or_create(root)
    new = castore.rotate(root)
    assert new.fingerprint_sha256 != old.fingerprint_sha256 and new.subject != old.subject
    assert castore.load(root) == new
    pair = castore.load_pair(new.key_path, new.cert_path)  # checks the match itself
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert pair.key.public_key().public_bytes(*spki) == pair.cert.public_key().public_bytes(*spki)
    assert mode(new.key_path) == 0o600 and mode(new.cert_path) == 0o600
    assert sorted(os.listdir(os.path.dirname(new.key_path))) == [".lock", "ca.key", "ca.pem"]


def test_rotate_on_an_empty_state_root_makes_the_first_ca(root):
    info = castore.rotate(root)
    assert castore.load(root) == info and mode(root) == 0o700


def test_readers_never_see_a_half_rotated_pair(root):
    castore.load_or_create(root)
    key, cert = statelayout.ca_key_path(root), statelayout.ca_cert_path(root)
    stop, errors = threading.Event(), []

    def rotate():
        try:
            while not stop.is_set():
                castore.rotate(root)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=rotate)
    t.start()
    try:
        seen = set()
        for _ in range(300):
            seen.add(castore.load_pair(key, cert).cert_pem)  # raises CaError on a mismatched pair
    finally:
        stop.set()
        t.join()
    assert not errors
    assert len(seen) > 1  # rotations really happened while reading


def test_a_symlinked_key_is_refused(root, tmp_path):
    info = castore.load_or_create(root)
    elsewhere = tmp_path / "elsewhere.key"
    os.rename(info.key_path, elsewhere)
    os.symlink(elsewhere, info.key_path)
    for read in (castore.load, castore.load_or_create):
        with pytest.raises(CaError, match="is a symlink"):
            read(root)
    with pytest.raises(CaError, match="is a symlink"):
        castore.load_pair(info.key_path, info.cert_path)
    assert os.path.islink(info.key_path)  # refused, not replaced behind the user's back


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(root, loose):
    info = castore.load_or_create(root)
    os.chmod(info.key_path, loose)
    with pytest.raises(CaError, match=r"readable by group or others .*firma ca rotate"):
        castore.load(root)
    with pytest.raises(CaError, match="readable by group or others"):
        castore.load_or_create(root)


def test_a_key_of_another_user_is_refused(root):
    if os.geteuid() != 0:
        pytest.fail("the test chowns a file to another user; CI runs as root")
    info = castore.load_or_create(root)
    other = pwd.getpwnam("nobody")
    os.chown(info.key_path, other.pw_uid, other.pw_gid)
    with pytest.raises(CaError, match=f"owned by uid {other.pw_uid}"):
        castore.load(root)


def test_a_key_that_does_not_match_the_certificate_is_refused(root, tmp_path):
    info = castore.load_or_create(root)
    other = castore.load_or_create(str(tmp_path / "other"))
    os.replace(other.key_path, info.key_path)
    with pytest.raises(CaError, match="does not match the certificate .*firma ca rotate"):
        castore.load(root)
    with pytest.raises(CaError, match="does not match"):
        castore.load_or_create(root)
    fixed = castore.rotate(root)  # the fix the message names
    assert castore.load(root) == fixed


def test_an_incomplete_pair_is_refused_not_silently_replaced(root):
    info = castore.load_or_create(root)
    os.unlink(info.cert_path)
    with pytest.raises(CaError, match="incomplete.*ca.key exists without .*ca.pem"):
        castore.load_or_create(root)
    assert not os.path.exists(info.cert_path)


def test_a_loose_ca_directory_is_refused(root):
    info = castore.load_or_create(root)
    os.chmod(os.path.dirname(info.key_path), 0o755)
    with pytest.raises(CaError, match="must be 0700"):
        castore.load(root)


def test_an_expired_ca_is_refused_for_use_but_shown(root, monkeypatch):
    info = castore.load_or_create(root)

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(days=3700)

    monkeypatch.setattr("datetime.datetime", Later)
    with pytest.raises(CaError, match="expired .*firma ca rotate"):
        castore.load_or_create(root)
    monkeypatch.undo()
    assert castore.load(root) == info


def test_trust_bundle_is_the_system_bundle_then_the_ca():
    assert castore.trust_bundle(b"SYSTEM", b"CA\n") == b"SYSTEM\nCA\n"


def test_system_bundle_path_takes_the_first_candidate_that_exists():
    cands = castore.SYSTEM_BUNDLE_CANDIDATES
    assert cands[0] == "/etc/ssl/certs/ca-certificates.crt" and cands[-1] == "/etc/ssl/cert.pem" and len(cands) == 4
    assert castore.system_bundle_path(lambda p: p == "/etc/ssl/cert.pem") == "/etc/ssl/cert.pem"
    assert castore.system_bundle_path(lambda p: p in (cands[1], cands[3])) == cands[1]
    assert castore.system_bundle_path(lambda p: False) is None


def keytool_list(store: bytes, path) -> str:
    path.write_bytes(store)
    r = subprocess.run(["/usr/bin/keytool", "-list", "-keystore", str(path), "-storetype", "PKCS12",
                        "-storepass", castore.JAVA_TRUSTSTORE_PASSWORD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def colon_fingerprint(hexdigest: str) -> str:
    return ":".join(hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)).upper()


def test_java_truststore_lists_every_parsable_certificate_as_trusted(root, tmp_path):
    assert castore.JAVA_TRUSTSTORE_PASSWORD == "changeit"
    ca = castore.load_or_create(root)
    other = castore.load_or_create(str(tmp_path / "other"))
    garbage = b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    system = other.cert_pem + garbage + other.cert_pem  # a duplicate and an unparsable block
    out = keytool_list(castore.java_truststore(castore.trust_bundle(system, ca.cert_pem)), tmp_path / "ts.p12")
    assert "Your keystore contains 2 entries" in out
    lines = out.splitlines()
    for info in (ca, other):
        at = lines.index(f"Certificate fingerprint (SHA-256): {colon_fingerprint(info.fingerprint_sha256)}")
        assert "trustedCertEntry" in lines[at - 1]
        assert lines[at - 1].startswith(info.subject.split("CN=")[1].lower())  # alias: the CA's name


def test_java_truststore_of_the_host_bundle_keeps_firma_ca(root, tmp_path):
    """With the real system bundle (what `firma run` builds): firma's CA is among the entries."""
    path = castore.system_bundle_path(os.path.isfile)
    assert path is not None, "the test host has no system CA bundle"
    with open(path, "rb") as f:
        system = f.read()
    ca = castore.load_or_create(root)
    out = keytool_list(castore.java_truststore(castore.trust_bundle(system, ca.cert_pem)), tmp_path / "ts.p12")
    assert f"Certificate fingerprint (SHA-256): {colon_fingerprint(ca.fingerprint_sha256)}" in out
    count = int(out.split("Your keystore contains ")[1].split()[0])
    assert count > 10


def test_castore_never_imports_ssl(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys, firma.castore; assert 'ssl' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # And in use, as the launcher runs it: `ssl` blocked the way cli.main.entry blocks it.
    script = (
        "import sys; sys.modules['ssl'] = None\n"
        "from firma import castore as c\n"
        f"i = c.load_or_create({str(tmp_path / 'state')!r}); c.rotate({str(tmp_path / 'state')!r})\n"
        "assert c.load(i.key_path.rsplit('/ca/', 1)[0]) is not None\n"
        "c.java_truststore(c.trust_bundle(b'', i.cert_pem))\n"
        "assert sys.modules['ssl'] is None\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

"""Leaf certificates for inspected connections (firma.services.leafcerts): real TLS handshakes on
127.0.0.1 against a client that trusts only firma's CA (hostname checked, strict X.509 checks
on), IP-literal leaves, ALPN http/1.1 only, leaf files gone once loaded, and the per-name cache
(reuse, LRU bound, re-mint near expiry)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from firma import castore, privfs
from firma.errors import CaError
from firma.services import leafcerts
from firma.services.leafcerts import LeafMint


@pytest.fixture
def ca(tmp_path):
    return castore.load_or_create(str(tmp_path / "state"))


@pytest.fixture
def leaves(tmp_path):
    path = str(tmp_path / "state" / "leaves")
    privfs.ensure_dir(path)
    return path


@pytest.fixture
def mint(ca, leaves):
    return LeafMint(ca.key_path, ca.cert_path, leaves)


def client_context(ca) -> ssl.SSLContext:
    """Trusting only this CA (its PEM as read when it was made: ca.pem may be rotated since)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: the leaves must pass it
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # the server must pick http/1.1
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str):
    """A TLS handshake over 127.0.0.1: (the client's negotiated ALPN, the leaf it was shown as DER).
    The client's verification error propagates."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused the leaf (the control cases)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=30) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
                return tls.selected_alpn_protocol(), tls.getpeercert(binary_form=True)
    finally:
        listener.close()
        t.join(30)


def test_a_client_trusting_only_firma_ca_accepts_the_leaf_for_its_name(ca, mint):
    alpn, der = handshake(mint.context_for("api.example.test"), client_context(ca), "api.example.test")
    assert alpn == "http/1.1"
    leaf = x509.load_der_x509_certificate(der)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.test"]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "api.example.test"


def test_the_same_leaf_is_refused_for_another_name(ca, mint):
    """Control: the client really checks the name against the leaf."""
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(mint.context_for("api.example.test"), client_context(ca), "other.example.test")


def test_a_client_not_trusting_firma_ca_refuses_the_leaf(mint):
    """Control: the handshake succeeds above because of firma's CA, not a lax client."""
    trusting_nothing = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verification on, no CA loaded
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"):
        handshake(mint.context_for("api.example.test"), trusting_nothing, "api.example.test")


def test_the_leaf_is_what_the_design_names(ca, mint):
    _, der = handshake(mint.context_for("api.example.test"), client_context(ca), "api.example.test")
    leaf = x509.load_der_x509_certificate(der)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    leaf.verify_directly_issued_by(ca_cert)
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    now = datetime.now(timezone.utc)
    assert timedelta(minutes=4) <= now - leaf.not_valid_before_utc <= timedelta(minutes=6)
    assert timedelta(hours=23, minutes=58) <= leaf.not_valid_after_utc - now <= timedelta(hours=24, minutes=1)
    assert leaf.serial_number > 0


def test_an_ip_literal_gets_an_ip_address_leaf(ca, mint):
    _, der = handshake(mint.context_for("127.0.0.1"), client_context(ca), "127.0.0.1")
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == []


def test_an_ipv6_literal_gets_an_ip_address_leaf(ca, mint):
    # Over 127.0.0.1: the name checked is the one the client asks for, not the socket's address.
    _, der = handshake(mint.context_for("::1"), client_context(ca), "::1")
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake(mint.context_for("::1"), client_context(ca), "::2")


def test_a_name_too_long_for_a_common_name_still_verifies(ca, mint):
    name = ("a" * 60 + ".") * 3 + "example.test"
    _, der = handshake(mint.context_for(name), client_context(ca), name)
    leaf = x509.load_der_x509_certificate(der)
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_leaf_files_exist_privately_only_while_loading(mint, leaves, monkeypatch):
    seen = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        for path in (certfile, keyfile):
            st = os.lstat(path)
            seen.append((os.path.dirname(path), stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink))
        return real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    mint.context_for("api.example.test")
    mint.context_for("b.example.test")
    assert seen == [(leaves, True, 0o600, 1)] * 4
    assert os.listdir(leaves) == []
    assert stat.S_IMODE(os.stat(leaves).st_mode) == 0o700


def test_contexts_are_cached_per_name_with_an_lru_bound(ca, leaves):
    mint = LeafMint(ca.key_path, ca.cert_path, leaves, max_cached=2)
    a = mint.context_for("a.example.test")
    assert mint.context_for("a.example.test") is a
    b = mint.context_for("b.example.test")
    assert b is not a
    mint.context_for("a.example.test")  # a is now the most recent
    mint.context_for("c.example.test")  # evicts b
    assert mint.context_for("a.example.test") is a
    assert mint.context_for("b.example.test") is not b


def test_a_leaf_near_expiry_is_minted_again(ca, leaves, monkeypatch):
    mint = LeafMint(ca.key_path, ca.cert_path, leaves, lifetime_secs=3600)
    first = mint.context_for("api.example.test")
    real = leafcerts.time.time
    monkeypatch.setattr(leafcerts, "time", SimpleNamespace(time=lambda: real() + 3600 - 700))  # 11 min left
    assert mint.context_for("api.example.test") is first
    monkeypatch.setattr(leafcerts, "time", SimpleNamespace(time=lambda: real() + 3600 - 500))  # 8 min left
    again = mint.context_for("api.example.test")
    assert again is not first
    monkeypatch.undo()
    assert mint.context_for("api.example.test") is again


def test_concurrent_callers_get_working_contexts(ca, mint):
    results, errors = [], []

    def call(name):
        try:
            results.append((name, mint.context_for(name)))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(f"h{i % 4}.example.test",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 16
    alpn, _ = handshake(mint.context_for("h1.example.test"), client_context(ca), "h1.example.test")
    assert alpn == "http/1.1"


def test_a_missing_or_mismatched_ca_is_a_ca_error(ca, leaves, tmp_path):
    with pytest.raises(CaError, match="missing"):
        LeafMint(str(tmp_path / "none" / "ca.key"), str(tmp_path / "none" / "ca.pem"), leaves)
    other = castore.load_or_create(str(tmp_path / "other"))
    with pytest.raises(CaError, match="does not match"):
        LeafMint(other.key_path, ca.cert_path, leaves)
    os.chmod(ca.key_path, 0o640)
    with pytest.raises(CaError, match="readable by group or others"):
        LeafMint(ca.key_path, ca.cert_path, leaves)


def test_a_rotated_ca_does_not_change_a_running_mint(ca, mint, tmp_path):
    """Sandboxes running keep the CA they started with: the mint loaded it once."""
    rotated = castore.rotate(str(tmp_path / "state"))
    with pytest.raises(ssl.SSLCertVerificationError):  # control: the new CA does not vouch for it
        handshake(mint.context_for("api.example.test"), client_context(rotated), "api.example.test")
    alpn, _ = handshake(mint.context_for("api.example.test"), client_context(ca), "api.example.test")
    assert alpn == "http/1.1"

"""Audit canonical bytes, signature interop, tamper/reorder (DESIGN §9; ATTACKS C.8 57)."""

import base64
import hashlib
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firma.core import auditfmt


def sample(**kw):
    return auditfmt.make_event(session_id="s", agent_id="a", action="http.request", resource="http://x/", decision=2,
                               deny_reason="host_not_allowed", sandbox_id="sbx_1", **kw)


def test_field_order_and_canonical_text():
    ev = sample()
    assert list(ev) == list(auditfmt.FIELDS)
    text = auditfmt.canonical_bytes(ev).decode()
    assert text.split("\n") == [str(ev[f]) for f in auditfmt.FIELDS]
    assert len(auditfmt.FIELDS) == 19
    line = json.loads(auditfmt.signed_line(ev, auditfmt.generate_key()))
    assert list(line) == list(auditfmt.FIELDS) + ["signature"]


def test_signature_interop_sign_digest_as_message():
    """A ref-style verifier: sha256 of the joined values, then ecdsa_verify(sha256(digest))."""
    key = auditfmt.generate_key()
    line = json.loads(auditfmt.signed_line(sample(), key))
    joined = "\n".join(str(line[f]) for f in auditfmt.FIELDS).encode()
    digest = hashlib.sha256(joined).digest()
    key.public_key().verify(base64.b64decode(line["signature"]), digest, ec.ECDSA(hashes.SHA256()))


def test_tamper_fails_reorder_passes():
    key = auditfmt.generate_key()
    pub = key.public_key()
    line = auditfmt.signed_line(sample(), key)
    assert auditfmt.verify_line(line, pub) == (True, "")
    obj = json.loads(line)
    reordered = json.dumps(dict(reversed(list(obj.items()))), indent=1).replace("\n", " ")
    assert auditfmt.verify_line(reordered, pub)[0]
    for field, value in (("decision", 1), ("sandbox_id", "sbx_2"), ("resource", "http://y/"), ("timestamp", obj["timestamp"] + 1)):
        bad = dict(obj, **{field: value})
        assert auditfmt.verify_line(json.dumps(bad), pub) == (False, "bad signature")
    assert not auditfmt.verify_line(json.dumps(dict(obj, decision="2")), pub)[0]  # type change
    assert not auditfmt.verify_line(json.dumps(dict(obj, extra=1)), pub)[0]
    assert not auditfmt.verify_line("{not json", pub)[0]
    assert not auditfmt.verify_line(line, auditfmt.generate_key().public_key())[0]


def test_uuid7_shape_and_order():
    a, b = auditfmt.uuid7(1_000_000_000_000), auditfmt.uuid7(2_000_000_000_000)
    assert a[14] == "7" and a[19] in "89ab" and a < b

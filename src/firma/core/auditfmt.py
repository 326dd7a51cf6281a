"""Audit events: field order, canonical signed bytes, signing and verification (DESIGN §9).

Signature (ref interop): the 19 values joined by "\\n" (integers in decimal, strings as is),
SHA-256 of that text, and the 32-byte digest signed *as the message* with ECDSA P-256/SHA-256
(so a verifier computing ecdsa_verify(sha256(digest)) agrees), DER, base64."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

from . import identity

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography is imported where a key is used, not here: the sidecar parses its key only when
# the first request needs it (launch latency), and the bridge, which only formats events,
# never needs it.

FIELDS = (
    "event_id",
    "session_id",
    "token_id",
    "agent_id",
    "action",
    "resource",
    "decision",
    "deny_reason",
    "enforcement_latency_us",
    "context_hash",
    "bundle_version",
    "timestamp",
    "dispatch_status",
    "dispatch_latency_us",
    "response_size",
    "sandbox_id",
    "provenance",
    "thread_id",
    "parent_action_id",
)
INT_FIELDS = frozenset(
    {"decision", "enforcement_latency_us", "timestamp", "dispatch_status", "dispatch_latency_us", "response_size"}
)
ALLOW, DENY, ABORT = 1, 2, 3
PROVENANCE = "firma-sidecar"


def uuid7(now_ns: int | None = None) -> str:
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    return identity.uuid7(ms, os.urandom(10))


def _clean(text: str) -> str:
    """Escape control characters: a newline inside a value would make the "\\n"-joined
    canonical text ambiguous (one signature covering two different field splits)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


def make_event(**values: Any) -> dict:
    """An ordered, unsigned event: every field present, defaults "" / 0."""
    out: dict = {}
    for f in FIELDS:
        v = values.get(f)
        if f in INT_FIELDS:
            out[f] = int(v or 0)
        else:
            out[f] = "" if v is None else _clean(str(v))
    if not out["event_id"]:
        out["event_id"] = uuid7()
    if not out["timestamp"]:
        out["timestamp"] = time.time_ns()
    if not out["provenance"]:
        out["provenance"] = PROVENANCE
    return out


def canonical_bytes(event: Mapping[str, Any]) -> bytes:
    parts = []
    for f in FIELDS:
        v = event.get(f, "")
        if f in INT_FIELDS:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"audit field {f} must be an integer")
            parts.append(str(v))
        else:
            if not isinstance(v, str):
                raise ValueError(f"audit field {f} must be a string")
            parts.append(v)
    return "\n".join(parts).encode("utf-8")


def digest(event: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical_bytes(event)).digest()


def _ecdsa_sha256():
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    return ec.ECDSA(hashes.SHA256())


def sign(event: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    return base64.b64encode(sign_digest(digest(event), key)).decode("ascii")


def sign_digest(message_digest: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """DER signature of a 32-byte digest signed as the message (the events' scheme, also used by
    the chain's checkpoint records)."""
    return key.sign(message_digest, _ecdsa_sha256())


def verify_digest(signature: bytes, message_digest: bytes, public_key: ec.EllipticCurvePublicKey) -> bool:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    try:
        public_key.verify(signature, message_digest, _ecdsa_sha256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def signed_line(event: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    out = {f: event[f] for f in FIELDS}
    out["signature"] = sign(out, key)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def verify_line(line: str, public_key: ec.EllipticCurvePublicKey) -> tuple[bool, str]:
    """(ok, why) for one JSON line; key order in the JSON does not matter."""
    try:
        obj = json.loads(line)
    except ValueError:
        return False, "not JSON"
    if not isinstance(obj, dict):
        return False, "not a JSON object"
    missing = [f for f in FIELDS + ("signature",) if f not in obj]
    if missing:
        return False, "missing field " + missing[0]
    extra = set(obj) - set(FIELDS) - {"signature"}
    if extra:
        return False, "unknown field " + sorted(extra)[0]
    for f in FIELDS:
        if isinstance(obj[f], str) and "\n" in obj[f]:
            return False, f"newline in field {f}"
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    try:
        sig = base64.b64decode(obj["signature"], validate=True)
        public_key.verify(sig, digest(obj), _ecdsa_sha256())
    except (InvalidSignature, ValueError, TypeError):
        return False, "bad signature"
    return True, ""


def generate_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_private_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("audit key must be an ECDSA P-256 private key")
    return key


def load_public_pem(data: bytes) -> ec.EllipticCurvePublicKey:
    """A public key PEM, or the private key PEM (its public half)."""
    if b"PRIVATE KEY" in data:
        return load_private_pem(data).public_key()
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - cryptography loads only to sign or verify (launch latency)

    key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("audit public key must be ECDSA P-256")
    return key


def request_resource(method: str, url: str) -> str:
    """The `resource` of an `http.request` event: the method and the URL without its query, as
    in a request line (`POST https://api.example.com/repos/x`)."""
    return f"{method} {url}" if method else url


def request_url(resource: str) -> str:
    """The URL of an `http.request` event's resource (the method dropped)."""
    return resource.rsplit(" ", 1)[-1]


def context_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()



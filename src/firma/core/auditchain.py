"""The audit hash chain and its signed checkpoint records (DESIGN §9 "Chain"), pure: no I/O.

Chain: H_0 = 32 zero bytes; H_n = sha256(H_{n-1} || line_n), line_n being the n-th event line's
bytes without its newline, running on across rotated files (a new file's chain starts from its
predecessor's final hash). The event lines keep their reference format; the chain lives beside
them, in `<log>.chain`: one JSON record per appended batch (sorted keys, one line), signed with
the audit key like an event (sha256 of the record's canonical text, signed as the message):

  v        1
  gen      the file's generation (1 for the first log file, +1 per rotation)
  seq      the record's index in its checkpoint file (0, 1, ...)
  start    the file line (0-based) of the batch's first line
  count    lines in the batch
  bytes    the log file's size after the batch
  prev     H before the batch (hex); seq 0 of generation g>1 carries generation g-1's final H
  chain    H after the batch (hex)
  lines    a short digest (first 8 bytes of sha256, hex) of each line: names the first broken
           position and tells deleted, inserted, reordered and modified lines apart
  gap      "" for lines this writer appended; "crash" for lines found in the log beyond the last
           checkpoint (a writer died between its two writes) and sealed by the next writer;
           "unchained" for lines found with no checkpoint file at all
  partial  the sealed gap ended in a partial line, which the sealing writer ended with a newline
  keep     how many rotated files the writer keeps (so a missing oldest file is noticed)
  time     Unix ns when the record was made"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

from . import auditfmt
from .record import record

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

GENESIS = bytes(32)
DIGEST_HEX = 16  # per-line digest: 8 bytes are plenty to locate a line among its neighbours
CHECKPOINT_VERSION = 1
GAP_CRASH = "crash"
GAP_UNCHAINED = "unchained"
CHAIN_SUFFIX = ".chain"
LOCK_SUFFIX = ".lock"


def chain_step(prev: bytes, line: bytes) -> bytes:
    return hashlib.sha256(prev + line).digest()


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:DIGEST_HEX]


@record
class Tip:
    """Where a file's chain stands: what the next record continues from."""

    gen: int = 1
    seq: int = 0  # the next record's seq
    lines: int = 0
    size: int = 0  # the log file's size (checkpoint key "bytes")
    chain: bytes = GENESIS
    keep: int = 0


@record
class Batch:
    """Lines about to be (or found) appended, with their chain computed from `prev`."""

    digests: tuple[str, ...]
    chain: bytes
    count: int


def chain_batch(prev: bytes, lines: list[bytes]) -> Batch:
    h = prev
    for line in lines:
        h = chain_step(h, line)
    return Batch(tuple(line_digest(x) for x in lines), h, len(lines))


def _canonical(rec: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def checkpoint_line(tip: Tip, batch: Batch, *, size_after: int, now_ns: int, key: ec.EllipticCurvePrivateKey,
                    gap: str = "", partial: bool = False) -> str:
    """The signed checkpoint record (one line, no newline) for `batch` appended after `tip`."""
    rec: dict[str, Any] = {
        "v": CHECKPOINT_VERSION, "gen": tip.gen, "seq": tip.seq, "start": tip.lines, "count": batch.count,
        "bytes": size_after, "prev": tip.chain.hex(), "chain": batch.chain.hex(), "lines": list(batch.digests),
        "gap": gap, "partial": partial, "keep": tip.keep, "time": now_ns,
    }
    rec["signature"] = base64.b64encode(auditfmt.sign_digest(hashlib.sha256(_canonical(rec)).digest(), key)).decode("ascii")
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def tip_after(line: bytes | str) -> Tip:
    """The tip a checkpoint record leaves (the writer's view; unverified). ValueError if malformed."""
    try:
        rec = json.loads(line)
        return Tip(gen=int(rec["gen"]), seq=int(rec["seq"]) + 1, lines=int(rec["start"]) + int(rec["count"]),
                   size=int(rec["bytes"]), chain=bytes.fromhex(rec["chain"]), keep=int(rec.get("keep", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed checkpoint record: {exc}") from None


@record
class Checkpoint:
    gen: int
    seq: int
    start: int
    count: int
    size: int
    prev: bytes
    chain: bytes
    lines: tuple[str, ...]
    gap: str
    partial: bool
    keep: int


_INT_KEYS = ("v", "gen", "seq", "start", "count", "bytes", "keep", "time")


def parse_checkpoint(line: bytes, public_key: ec.EllipticCurvePublicKey) -> tuple[Checkpoint | None, str]:
    """(record, "") when the line is a well-formed record whose signature verifies, else (None, why)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None, "not JSON"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    try:
        if any(isinstance(rec[k], bool) or not isinstance(rec[k], int) for k in _INT_KEYS):
            return None, "a numeric field is not an integer"
        if rec["v"] != CHECKPOINT_VERSION:
            return None, f"unknown checkpoint version {rec['v']}"
        sig = base64.b64decode(rec["signature"], validate=True)
        lines = rec["lines"]
        if not isinstance(lines, list) or len(lines) != rec["count"] or not all(isinstance(x, str) for x in lines):
            return None, "line digests do not match the count"
        cp = Checkpoint(gen=rec["gen"], seq=rec["seq"], start=rec["start"], count=rec["count"], size=rec["bytes"],
                        prev=bytes.fromhex(rec["prev"]), chain=bytes.fromhex(rec["chain"]), lines=tuple(lines),
                        gap=str(rec["gap"]), partial=bool(rec["partial"]), keep=rec["keep"])
    except (KeyError, TypeError, ValueError):
        return None, "missing or malformed field"
    if not auditfmt.verify_digest(sig, hashlib.sha256(_canonical(rec)).digest(), public_key):
        return None, "bad signature"
    return cp, ""

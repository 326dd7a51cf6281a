"""Per-run identity (DESIGN §3). Pure: time and randomness come in as arguments."""

from __future__ import annotations

from typing import Mapping

from .model import Identity
from . import settings as env_names


def uuid7_hex(unix_ms: int, rand: bytes) -> str:
    """RFC 9562 UUIDv7 (32 hex digits) from a millisecond timestamp and at least 10 random bytes.
    Formatted here rather than with the uuid module, whose import costs a launch ~3 ms."""
    if len(rand) < 10:
        raise ValueError("uuid7 needs 10 random bytes")
    r = int.from_bytes(rand[:10], "big")
    rand_a = (r >> 68) & 0xFFF
    rand_b = r & ((1 << 62) - 1)
    value = ((unix_ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return f"{value:032x}"


def uuid7(unix_ms: int, rand: bytes) -> str:
    """The same UUIDv7 in its canonical 8-4-4-4-12 text form."""
    h = uuid7_hex(unix_ms, rand)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def sandbox_id(unix_ms: int, rand: bytes) -> str:
    return "sbx_" + uuid7_hex(unix_ms, rand)


def attribution_user(environ: Mapping[str, str]) -> str:
    """Host `LOGNAME`, then `USER`, then `USERNAME`, else `unknown`."""
    for name in ("LOGNAME", "USER", "USERNAME"):
        v = environ.get(name, "").strip()
        if v:
            return v
    return "unknown"


def build_identity(
    *,
    environ: Mapping[str, str],
    profile: str,
    agent_id: str | None,
    unix_ms: int,
    rand: bytes,
) -> Identity:
    """`rand` is 20 bytes: the first 10 for the sandbox id, the rest for a fresh session id."""
    session = environ.get(env_names.RUN_SESSION_ID, "").strip()
    if not session:
        session = uuid7(unix_ms, rand[10:20])
    agent = (agent_id or "").strip() or profile
    return Identity(
        sandbox_id=sandbox_id(unix_ms, rand[:10]),
        session_id=session,
        profile=profile,
        agent_id=agent,
        user=attribution_user(environ),
    )

"""firma's settings from the environment: every `FIRMA_*` variable, config discovery, the state
root and the one truthiness rule (pure: the environment arrives as a mapping)."""

from __future__ import annotations


TRUTHY = frozenset({"1", "true", "yes", "on"})


def is_truthy(value: str | None) -> bool:
    """`1|true|yes|on`, trimmed, any case (ref)."""
    return value is not None and value.strip().lower() in TRUTHY

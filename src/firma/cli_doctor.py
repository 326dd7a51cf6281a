"""`firma doctor` (placeholder until implemented)."""

from __future__ import annotations

from .errors import FirmaError


def add_parser(sub):
    return sub.add_parser("doctor", help="not implemented yet")


def run(args) -> int:
    raise FirmaError("firma doctor is not implemented yet")

"""`firma contract` (placeholder until implemented)."""

from __future__ import annotations

from .errors import FirmaError


def add_parser(sub):
    return sub.add_parser("contract", help="not implemented yet")


def run(args) -> int:
    raise FirmaError("firma contract is not implemented yet")

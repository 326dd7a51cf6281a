"""`firma conformance` (placeholder until implemented)."""

from __future__ import annotations

from .errors import FirmaError


def add_parser(sub):
    return sub.add_parser("conformance", help="not implemented yet")


def run(args) -> int:
    raise FirmaError("firma conformance is not implemented yet")

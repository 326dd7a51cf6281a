"""`firma run` (placeholder until implemented)."""

from __future__ import annotations

from .errors import FirmaError


def add_parser(sub):
    return sub.add_parser("run", help="not implemented yet")


def run(args) -> int:
    raise FirmaError("firma run is not implemented yet")

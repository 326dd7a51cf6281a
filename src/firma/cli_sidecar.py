"""`firma sidecar` (placeholder until implemented)."""

from __future__ import annotations

from .errors import FirmaError


def add_parser(sub):
    return sub.add_parser("sidecar", help="not implemented yet")


def run(args) -> int:
    raise FirmaError("firma sidecar is not implemented yet")

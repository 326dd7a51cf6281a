"""Allow patterns as users write them (DESIGN §9 "Policy"), checked before anything starts. Pure:
the Public Suffix List is data from a maintained package (`publicsuffixlist`), read on first use.

- URL forms users paste (`https://pypi.org`, `https://pypi.org/simple`) become `HOST:PORT` with the
  scheme's port, and say that a path was dropped (the allow list is per destination, not per path).
- A wildcard over a whole public suffix is refused when the suffix is in the PSL's ICANN section
  (`*.co.uk`, `*.com`): it would allow every registrant there. One whose base is, or has under it,
  a private-section suffix (`*.github.io`, `*.amazonaws.com`) is accepted with a warning: anyone
  can publish a site there."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import PolicyError
from .record import record

SCHEME_PORTS = {"http": 80, "https": 443}


@record
class CheckedAllow:
    patterns: tuple[str, ...]  # as the sidecar will parse them
    notes: tuple[str, ...]  # URL forms rewritten
    warnings: tuple[str, ...]  # wildcards over a private-section public suffix


@functools.cache
def _lists() -> tuple[Any, Any]:
    from publicsuffixlist import PublicSuffixList  # noqa: PLC0415 - ~100 ms: only for a wildcard pattern

    return PublicSuffixList(only_icann=True), PublicSuffixList()


def normalize(text: str) -> tuple[str, str | None]:
    """A pasted URL → `HOST:PORT` (and a note); anything else unchanged."""
    raw = text.strip()
    if "://" not in raw:
        return raw, None
    from urllib.parse import urlsplit  # noqa: PLC0415 - only for a pasted URL (launch latency)

    try:
        u = urlsplit(raw)
        port = u.port
    except ValueError as exc:
        raise PolicyError(f"invalid allow-host {text!r}: {exc}; give HOST[:PORT]") from None
    scheme = u.scheme.lower()
    if scheme not in SCHEME_PORTS or not u.hostname:
        raise PolicyError(f"invalid allow-host {text!r}: only http:// and https:// URLs are understood; give HOST[:PORT]")
    if u.username or u.password:
        raise PolicyError(f"invalid allow-host {text!r}: credentials in an allow pattern; give HOST[:PORT]")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    pattern = f"{host}:{port or SCHEME_PORTS[scheme]}"
    dropped = u.path not in ("", "/") or u.query or u.fragment
    note = f"allow-host {raw!r} is read as {pattern!r}" + (
        " (the path is dropped: allowing is per destination; use a Cedar policy for paths)" if dropped else "")
    return pattern, note


def wildcard_scope(base: str) -> tuple[str, str] | None:
    """("icann", suffix) when `*.base` covers an ICANN public suffix; ("private", suffix) when base
    is, or has under it, a private-section one; None for an ordinary registrable domain."""
    icann, full = _lists()
    if icann.is_public(base):
        return "icann", base
    if full.is_public(base):
        return "private", base
    # the PSL's rules as stored, wildcard and exception marks dropped
    under = {s.lstrip("*.!") for s in full._publicsuffix if s.endswith("." + base)}
    under = {s for s in under if s != base and not icann.is_public(s)}
    if under:
        return "private", min(under, key=lambda s: (s.count("."), s))
    return None


def check(patterns: tuple[str, ...]) -> CheckedAllow:
    """Normalize and validate every pattern (one-line PolicyError naming the first bad one)."""
    if not patterns:
        return CheckedAllow((), (), ())
    from .policy import parse_pattern  # noqa: PLC0415 - only with patterns to check (launch latency)

    out: list[str] = []
    notes: list[str] = []
    warnings: list[str] = []
    for text in patterns:
        pattern, note = normalize(text)
        parsed = parse_pattern(pattern)
        if parsed.wildcard:
            scope = wildcard_scope(parsed.host)
            if scope is not None and scope[0] == "icann":
                raise PolicyError(
                    f"allow-host {text!r} covers the public suffix {scope[1]!r}: every registrant there would be "
                    "allowed; name the hosts you need (e.g. 'pypi.org')"
                )
            if scope is not None:
                warnings.append(
                    f"{text!r} lets the agent reach anyone's site under {scope[1]!r} (a public suffix where anyone "
                    "can publish); prefer the exact hosts you need"
                )
        if note:
            notes.append(note)
        out.append(pattern)
    return CheckedAllow(tuple(dict.fromkeys(out)), tuple(notes), tuple(warnings))


def check_opaque(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """`allow_tcp` entries: each an exact HOST:PORT (no wildcard, a port), canonical."""
    if not patterns:
        return ()
    from .policy import parse_pattern  # noqa: PLC0415 - only with patterns to check (launch latency)

    out: list[str] = []
    for text in patterns:
        parsed = parse_pattern(text)
        if parsed.wildcard or parsed.port is None:
            raise PolicyError(f"allow-tcp {text!r} must name one exact HOST:PORT (no wildcard, a port)")
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        out.append(f"{host}:{parsed.port}")
    return tuple(dict.fromkeys(out))

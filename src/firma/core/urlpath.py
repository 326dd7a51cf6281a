"""The one normal form of a request path that policy decides on (DESIGN §9 "Policy"). Pure.

Cedar rules such as `resource.path like "/admin*"` must see the path the upstream will act on,
not a spelling of it: `/./admin`, `//admin`, `/public/../admin` and `/public/%2e%2e/secret` all
name other paths than they look like. The normal form:
  1. percent-decode the unreserved characters (RFC 3986 §2.3: ALPHA DIGIT - . _ ~), so `%2E` is
     a dot and `%41` an `A`; everything else stays encoded — `%2F` in particular is never a
     slash (npm's `@scope%2fname`, GitLab's encoded project ids);
  2. remove dot segments (RFC 3986 §5.2.4);
  3. collapse runs of `/`.
The request is still forwarded byte for byte (rewriting would break signed requests such as AWS
SigV4); when the original differs from the normal form by dot segments or doubled slashes and the
policy has path rules, the request is refused as `ambiguous_path` (servers disagree on those)."""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})?")
_SLASHES = re.compile(r"/{2,}")


def _decode_unreserved(path: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return "%25"  # a stray `%`: escaped, so decoding never forms a new escape
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    return _PCT.sub(one, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path that starts with `/`."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def normalize(path: str) -> str:
    """The normal form of a path (no query), always starting with `/`."""
    p = _decode_unreserved(path if path.startswith("/") else "/" + path)
    return _SLASHES.sub("/", remove_dot_segments(p))


def ambiguous(path: str) -> bool:
    """True when `path` differs from its normal form by dot segments or doubled slashes (after
    decoding the unreserved characters, so `%2e%2e` counts) — not by mere percent-encoding."""
    decoded = _decode_unreserved(path if path.startswith("/") else "/" + path)
    return normalize(path) != decoded


def query_names(target: str, limit: int = 64) -> tuple[str, ...]:
    """The parameter names of a target's query string, percent-decoded, in order, each once (at
    most `limit`): what Cedar sees of a query (its values never reach the policy or the audit)."""
    from urllib.parse import unquote_plus  # noqa: PLC0415 - only for inspected requests

    query = target.split("#", 1)[0].partition("?")[2]
    names: dict[str, None] = {}
    for part in query.split("&"):
        name = unquote_plus(part.split("=", 1)[0], errors="replace")
        if name:
            names.setdefault(name[:256])
        if len(names) >= limit:
            break
    return tuple(names)

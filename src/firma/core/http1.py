"""HTTP/1.x heads and body framing, sans-IO (DESIGN §3, §9).

Strict where ambiguity could be smuggled: CRLF only, no obs-fold, no whitespace before ':',
token header names, UTF-8 request heads, Content-Length with Transfer-Encoding refused,
Transfer-Encoding other than exactly `chunked` refused, chunk sizes validated byte by byte."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from .wire import ATTRIBUTION_HEADERS
from .record import record, replace

MAX_HEAD = 128 * 1024
MAX_HEADERS = 256
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(r"[\x00-\x20\x7f]")


class HttpError(ValueError):
    """A head or body that must not be forwarded; `reason` is the audit/deny code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


Headers = tuple[tuple[str, str], ...]


@record
class RequestHead:
    method: str
    target: str
    version: str  # "HTTP/1.0" | "HTTP/1.1"
    headers: Headers  # original names and order

    def get_all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def get(self, name: str) -> str | None:
        vals = self.get_all(name)
        return vals[-1] if vals else None

    def without(self, names: Iterable[str]) -> "RequestHead":
        drop = {n.lower() for n in names}
        return replace(self, headers=tuple((k, v) for k, v in self.headers if k.lower() not in drop))

    def with_added(self, pairs: Iterable[tuple[str, str]]) -> "RequestHead":
        return replace(self, headers=self.headers + tuple(pairs))

    def to_bytes(self) -> bytes:
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@record
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers

    def get_all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def without(self, names: Iterable[str]) -> "ResponseHead":
        drop = {n.lower() for n in names}
        return replace(self, headers=tuple((k, v) for k, v in self.headers if k.lower() not in drop))

    def with_added(self, pairs: Iterable[tuple[str, str]]) -> "ResponseHead":
        return replace(self, headers=self.headers + tuple(pairs))

    def to_bytes(self) -> bytes:
        lines = [f"{self.version} {self.status} {self.reason}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def head_end(buf: bytes | bytearray, max_head: int = MAX_HEAD) -> int | None:
    """Index just past the blank line ending the head in buf, None if incomplete.

    Raises HttpError(`head_too_large`) once max_head bytes hold no complete head."""
    i = buf.find(b"\r\n\r\n", 0, max_head + 4)
    if i >= 0 and i + 4 <= max_head:
        return i + 4
    if len(buf) >= max_head:
        raise HttpError("head_too_large", f"request head exceeds {max_head} bytes")
    return None


_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def plausible_request_start(buf: bytes | bytearray) -> bool:
    """False as soon as the first bytes cannot begin `METHOD SP` (a SOCKS greeting, a TLS
    ClientHello sent to the plain proxy port): such a peer is refused at once, not after a timeout."""
    start = 0
    while buf[start : start + 2] == b"\r\n":
        start += 2
    for i, b in enumerate(buf[start : start + 33]):
        if b == 0x20:
            return i > 0
        if b not in _TOKEN_BYTES:
            return False
    return len(buf) - start < 33


_REQUEST_LINE = re.compile(rb"^(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/\d\.\d\r?\n")


def tunnel_carries_http(buf: bytes | bytearray) -> bool | None:
    """Whether the first bytes a client sent into a CONNECT tunnel are a plain HTTP/1.x request:
    True (a whole request line), False (cannot be one), None (could still become one)."""
    if _REQUEST_LINE.match(bytes(buf[:8192])):
        return True
    if b"\n" in buf or len(buf) >= 8192 or not plausible_request_start(buf):
        return False
    return None


def _parse_fields(lines: list[str]) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise HttpError("malformed_request", f"more than {MAX_HEADERS} header fields")
    out = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise HttpError("malformed_request", "obsolete line folding in header")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HttpError("malformed_request", "invalid header field name")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError("malformed_request", f"control character in header {name}")
        out.append((name, value))
    return tuple(out)


def _split_lines(text: str) -> list[str]:
    body = text[:-4] if text.endswith("\r\n\r\n") else text
    lines = body.split("\r\n")
    for line in lines:
        if "\r" in line or "\n" in line:
            raise HttpError("malformed_request", "bare CR or LF in head")
    return lines


def parse_request_head(raw: bytes) -> RequestHead:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError("non_utf8_head", "request head is not valid UTF-8") from None
    lines = _split_lines(text)
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError("malformed_request", "request line is not 'METHOD TARGET VERSION'")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError("malformed_request", "invalid method")
    if not target or _TARGET_BAD.search(target):
        raise HttpError("malformed_request", "invalid request target")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError("malformed_request", f"unsupported protocol version {version[:16]!r}")
    return RequestHead(method, target, version, _parse_fields(lines[1:]))


def parse_response_head(raw: bytes) -> ResponseHead:
    text = raw.decode("latin-1")  # upstream reason phrases may carry obs-text
    lines = _split_lines(text)
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise HttpError("bad_upstream_response", "invalid upstream status line")
    return ResponseHead(version, int(code), reason, _parse_fields(lines[1:]))


@record
class Framing:
    kind: str  # "none" | "length" | "chunked" | "close"
    length: int = 0


def _content_length(values: list[str]) -> int | None:
    if not values:
        return None
    seen = set()
    for v in values:
        for item in v.split(","):
            item = item.strip(" \t")
            if not item.isascii() or not item.isdigit() or len(item) > 18:
                raise HttpError("bad_content_length", "invalid Content-Length")
            seen.add(int(item))
    if len(seen) != 1:
        raise HttpError("bad_content_length", "conflicting Content-Length values")
    return seen.pop()


def _is_chunked(values: list[str]) -> bool:
    codings = [c.strip(" \t").lower() for v in values for c in v.split(",")]
    if codings != ["chunked"]:
        raise HttpError("bad_transfer_encoding", f"unsupported Transfer-Encoding {', '.join(codings)[:64]!r}")
    return True


def request_framing(head: RequestHead) -> Framing:
    te = head.get_all("transfer-encoding")
    cl = head.get_all("content-length")
    if te and cl:
        raise HttpError("cl_te_conflict", "both Content-Length and Transfer-Encoding")
    if te:
        if head.version == "HTTP/1.0":
            raise HttpError("bad_transfer_encoding", "Transfer-Encoding on HTTP/1.0")
        _is_chunked(te)
        return Framing("chunked")
    n = _content_length(cl)
    return Framing("length", n) if n else Framing("none")


def response_framing(head: ResponseHead, request_method: str) -> Framing:
    if request_method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return Framing("none")
    te = head.get_all("transfer-encoding")
    if te:
        codings = [c.strip(" \t").lower() for v in te for c in v.split(",")]
        return Framing("chunked") if codings and codings[-1] == "chunked" else Framing("close")
    n = _content_length(head.get_all("content-length"))
    if n is None:
        return Framing("close")
    return Framing("length", n) if n else Framing("none")


def stamp_attribution(head: RequestHead, attribution: Mapping[str, str]) -> RequestHead:
    """Remove every attribution header the client sent (any case, all duplicates), then append
    the trusted values in sorted order (DESIGN §3)."""
    trusted = sorted((k.lower(), v) for k, v in attribution.items() if k.lower() in ATTRIBUTION_HEADERS)
    return head.without(ATTRIBUTION_HEADERS).with_added(trusted)


class ChunkedScanner:
    """Validates a chunked body as raw bytes pass through; `feed` says how many bytes of `data`
    belong to the body, so the caller forwards exactly those and keeps the rest (the next
    pipelined request). With `decode`, the payload bytes are also collected in `payload` (the
    caller takes and clears them): a scan for a needle must see the payload, not the framing,
    whose size lines could split it."""

    def __init__(self, decode: bool = False) -> None:
        self.payload: bytearray | None = bytearray() if decode else None
        self._state = "size"
        self._line = bytearray()
        self._remaining = 0
        self._trailer = 0
        self.done = False
        self.body_bytes = 0  # decoded payload bytes so far (for size limits)

    def feed(self, data: bytes | memoryview) -> int:
        mv = memoryview(data)
        i = 0
        n = len(mv)
        while i < n and not self.done:
            st = self._state
            if st == "data":
                take = min(self._remaining, n - i)
                if self.payload is not None:
                    self.payload += mv[i : i + take]
                i += take
                self._remaining -= take
                self.body_bytes += take
                if self._remaining == 0:
                    self._state = "data_cr"
                continue
            b = mv[i]
            i += 1
            if st == "data_cr":
                if b != 13:
                    raise HttpError("bad_chunk", "chunk data not followed by CRLF")
                self._state = "data_lf"
            elif st == "data_lf":
                if b != 10:
                    raise HttpError("bad_chunk", "chunk data not followed by CRLF")
                self._state = "size"
            elif st in ("size", "trailer"):
                if b == 10:
                    if not self._line.endswith(b"\r"):
                        raise HttpError("bad_chunk", "bare LF in chunked framing")
                    line = bytes(self._line[:-1])
                    self._line.clear()
                    if st == "size":
                        self._size_line(line)
                    elif line == b"":
                        self.done = True
                    else:
                        self._trailer_line(line)
                else:
                    self._line.append(b)
                    if b == 13 and len(self._line) > 1 and self._line[-2] == 13:
                        raise HttpError("bad_chunk", "bare CR in chunked framing")
                    limit = MAX_CHUNK_LINE if st == "size" else MAX_TRAILERS
                    if len(self._line) > limit:
                        raise HttpError("bad_chunk", "chunk line too long")
        return i

    def _size_line(self, line: bytes) -> None:
        size, _, ext = line.partition(b";")
        size = size.rstrip(b" \t")
        if not size or len(size) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise HttpError("bad_chunk", "invalid chunk size")
        if any(c < 0x20 and c != 9 or c == 0x7F for c in ext):
            raise HttpError("bad_chunk", "control character in chunk extension")
        self._remaining = int(size, 16)
        self._state = "data" if self._remaining else "trailer"

    def _trailer_line(self, line: bytes) -> None:
        self._trailer += len(line)
        if self._trailer > MAX_TRAILERS:
            raise HttpError("bad_chunk", "trailers too large")
        try:
            _parse_fields([line.decode("utf-8")])
        except (UnicodeDecodeError, HttpError):
            raise HttpError("bad_chunk", "invalid trailer field") from None


@record
class Target:
    scheme: str  # "http" | "connect"
    authority: str
    path: str  # origin-form path with query (what upstream gets)


def split_target(head: RequestHead) -> Target:
    """The proxy target of a request: authority-form for CONNECT, absolute-form otherwise."""
    if head.method == "CONNECT":
        if "/" in head.target or "?" in head.target or "#" in head.target:
            raise HttpError("malformed_request", "CONNECT target must be host:port")
        return Target("connect", head.target, "")
    t = head.target
    scheme, sep, rest = t.partition("://")
    if not sep:
        raise HttpError("not_proxy_request", "request target is not absolute-form (http://host/path)")
    if scheme.lower() != "http":
        raise HttpError("unsupported_scheme", f"scheme {scheme[:16]!r} is not proxied; use CONNECT for https")
    cut = len(rest)
    for ch in "/?#":
        j = rest.find(ch)
        if 0 <= j < cut:
            cut = j
    authority, path = rest[:cut], rest[cut:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return Target("http", authority, path)


def strip_query(path: str) -> str:
    return path.split("?", 1)[0]


def expects_continue(head: RequestHead) -> bool:
    """The client waits for `100 Continue` before sending its body (RFC 9110 §10.1.1)."""
    return any(v.strip().lower() == "100-continue" for v in head.get_all("expect"))

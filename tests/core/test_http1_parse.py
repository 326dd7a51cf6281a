"""HTTP/1.x head parsing, framing and attribution stamping (DESIGN §3, §9; ATTACKS C.2 19-20)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firma.core import http1
from firma.core.http1 import ChunkedScanner, HttpError
from firma.core.wire import ATTRIBUTION_HEADERS


def head(text: str) -> http1.RequestHead:
    return http1.parse_request_head(text.replace("\n", "\r\n").encode())


def test_parse_basic_absolute_form():
    h = head("GET http://a.com/x?q=1 HTTP/1.1\nHost: a.com\nX-Y:  v \n\n")
    assert (h.method, h.target, h.version) == ("GET", "http://a.com/x?q=1", "HTTP/1.1")
    assert h.get("x-y") == "v"
    t = http1.split_target(h)
    assert (t.authority, t.path) == ("a.com", "/x?q=1")


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"GET http://a/ HTTP/1.1\r\nX: \xff\xfe\r\n\r\n", "non_utf8_head"),
        (b"GET http://a/ HTTP/1.1\r\nX : v\r\n\r\n", "malformed_request"),
        (b"GET http://a/ HTTP/1.1\r\nX: v\r\n folded\r\n\r\n", "malformed_request"),
        (b"GET http://a/ HTTP/1.1\nX: v\r\n\r\n", "malformed_request"),
        (b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n", "malformed_request"),
        (b"GET  http://a/ HTTP/1.1\r\n\r\n", "malformed_request"),
        (b"GET http://a/ HTTP/2.0\r\n\r\n", "malformed_request"),
        (b"G@T http://a/ HTTP/1.1\r\n\r\n", "malformed_request"),
        (b"GET http://a/\x01 HTTP/1.1\r\n\r\n", "malformed_request"),
        (b"GET http://a/ HTTP/1.1\r\nX: \x00\r\n\r\n", "malformed_request"),
    ],
)
def test_malformed_heads(raw, reason):
    with pytest.raises(HttpError) as e:
        http1.parse_request_head(raw)
    assert e.value.reason == reason


def test_head_cap():
    assert http1.head_end(b"GET / HTTP/1.1\r\n\r\nrest") == 18
    assert http1.head_end(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(HttpError) as e:
        http1.head_end(b"A" * (128 * 1024))
    assert e.value.reason == "head_too_large"


@pytest.mark.parametrize(
    "headers,reason",
    [
        ("Content-Length: 5\nTransfer-Encoding: chunked", "cl_te_conflict"),
        ("Transfer-Encoding: chunked\nContent-Length: 5", "cl_te_conflict"),
        ("Transfer-Encoding: gzip, chunked", "bad_transfer_encoding"),
        ("Transfer-Encoding: chunked\nTransfer-Encoding: chunked", "bad_transfer_encoding"),
        ("Transfer-Encoding: xchunked", "bad_transfer_encoding"),
        ("Content-Length: 5\nContent-Length: 6", "bad_content_length"),
        ("Content-Length: 5, 6", "bad_content_length"),
        ("Content-Length: -1", "bad_content_length"),
        ("Content-Length: 0x10", "bad_content_length"),
        ("Content-Length: +5", "bad_content_length"),
    ],
)
def test_smuggling_framings_refused(headers, reason):
    with pytest.raises(HttpError) as e:
        http1.request_framing(head(f"POST http://a/ HTTP/1.1\n{headers}\n\n"))
    assert e.value.reason == reason


def test_framings():
    assert http1.request_framing(head("POST http://a/ HTTP/1.1\nContent-Length: 5\nContent-Length: 5\n\n")).length == 5
    assert http1.request_framing(head("POST http://a/ HTTP/1.1\nTransfer-Encoding: Chunked\n\n")).kind == "chunked"
    assert http1.request_framing(head("GET http://a/ HTTP/1.1\n\n")).kind == "none"


def test_chunked_scanner_exact_boundary_and_errors():
    body = b"5;ext=1\r\nhello\r\n0\r\nTrailer-X: y\r\n\r\n"
    sc = ChunkedScanner()
    assert sc.feed(body + b"GET http://next/") == len(body) and sc.done and sc.body_bytes == 5
    # byte at a time gives the same boundary
    sc = ChunkedScanner()
    total = 0
    for b in body:
        total += sc.feed(bytes([b]))
    assert total == len(body) and sc.done
    for bad in (b"zz\r\n", b"-1\r\n", b"5\r\nhelloXX", b"5\nhello\r\n", b"1" * 16 + b"\r\n", b"0\r\nbad trailer\r\n\r\n", b" 5\r\n"):
        with pytest.raises(HttpError):
            ChunkedScanner().feed(bad)


def test_stamp_removes_every_spelling_and_duplicate():
    h = head(
        "GET http://a/ HTTP/1.1\nX-Firma-Sandbox-Id: other\nx-firma-sandbox-id: other2\nX-FIRMA-USER: root\n"
        "x-firma-agent: fake\nX-Firma-Session-Id: s\nx-firma-profile: p\nX-Other: keep\n\n"
    )
    attr = {"x-firma-sandbox-id": "sbx_real", "x-firma-user": "u", "x-firma-agent": "a", "x-firma-session-id": "ss", "x-firma-profile": "generic"}
    s = http1.stamp_attribution(h, attr)
    for name in ATTRIBUTION_HEADERS:
        assert s.get_all(name) == [attr[name]]
    assert s.get("x-other") == "keep"
    # round trip through bytes keeps exactly one of each
    again = http1.parse_request_head(s.to_bytes())
    assert again.get_all("x-firma-sandbox-id") == ["sbx_real"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_property_parser_only_raises_http_error(data):
    try:
        h = http1.parse_request_head(data + b"\r\n\r\n")
        http1.request_framing(h)
    except HttpError:
        pass
    sc = ChunkedScanner()
    try:
        assert 0 <= sc.feed(data) <= len(data)
    except HttpError:
        pass


def test_split_target_rules():
    assert http1.split_target(head("CONNECT a.com:443 HTTP/1.1\n\n")).authority == "a.com:443"
    for t, reason in (("/x", "not_proxy_request"), ("https://a.com/", "unsupported_scheme"), ("ftp://a/", "unsupported_scheme")):
        with pytest.raises(HttpError) as e:
            http1.split_target(head(f"GET {t} HTTP/1.1\n\n"))
        assert e.value.reason == reason
    assert http1.split_target(head("GET http://allowed.com@evil.com/ HTTP/1.1\n\n")).authority == "allowed.com@evil.com"
    assert http1.split_target(head("GET http://a.com?x HTTP/1.1\n\n")).path == "/?x"


def test_plausible_request_start():
    assert http1.plausible_request_start(b"GE")
    assert http1.plausible_request_start(b"\r\nGET / HTTP/1.1")
    assert http1.plausible_request_start(b"CONNECT a:443 HTTP/1.1\r\n")
    for bad in (b"\x05\x01\x00", b"\x16\x03\x01\x02\x00", b" GET", b"G\x00", b"A" * 40, b"\x04\x01\x00\x50"):
        assert not http1.plausible_request_start(bad)


@pytest.mark.parametrize(
    "buf, want",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"\r\nPOST http://a/b HTTP/1.0\n", True),
        (b"GET / HT", None),  # could still become a request line
        (b"GET", None),
        (b"", None),
        (b"SSH-2.0-OpenSSH_9.6\r\n", False),  # a whole line that is not a request line
        (b"PING\r\n", False),
        (b"SET k v\r\n", False),
        (b"\x16\x03\x01\x02\x00", False),  # TLS
        (b"A" * 40, False),  # no method is that long
    ],
)
def test_tunnel_carries_http(buf, want):
    assert http1.tunnel_carries_http(buf) is want

"""The path normal form policy decides on (RFC 3986 dot segments, unreserved decoding, //)."""

import pytest
from hypothesis import given, settings, strategies as st

from firma.core.urlpath import ambiguous, normalize


@pytest.mark.parametrize("raw,want,amb", [
    ("/admin", "/admin", False),
    ("/./admin", "/admin", True),
    ("//admin", "/admin", True),
    ("/public/../admin", "/admin", True),
    ("/public/%2e%2e/secret.txt", "/secret.txt", True),
    ("/public/%2E%2E/secret.txt", "/secret.txt", True),
    ("/%61dmin", "/admin", False),
    ("/@scope%2fname", "/@scope%2Fname", False),  # %2F is never a slash
    ("/a/b/..", "/a/", True),
    ("/a/./", "/a/", True),
    ("/..", "/", True),
    ("", "/", False),
    ("/a%20b", "/a%20b", False),
])
def test_table(raw, want, amb):
    assert normalize(raw) == want
    assert ambiguous(raw) is amb


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="/.%2eE5F41ab", max_size=24))
def test_normal_form_is_stable_and_has_no_dot_segments_or_double_slashes(raw):
    n = normalize(raw)
    assert normalize(n) == n and n.startswith("/")
    assert "//" not in n and "/./" not in n + "/" and "/../" not in n + "/"

"""Allow patterns as users write them: URL forms, public-suffix wildcards (PSL)."""

import pytest

from firma.core.allowlist import check, normalize
from firma.errors import PolicyError


@pytest.mark.parametrize("text,pattern,dropped", [
    ("https://pypi.org", "pypi.org:443", False),
    ("https://pypi.org/simple", "pypi.org:443", True),
    ("http://files.example.com:8080/x?y", "files.example.com:8080", True),
    ("https://[2001:db8::1]/", "[2001:db8::1]:443", False),
    ("pypi.org", "pypi.org", None),
])
def test_url_forms_become_host_and_the_schemes_port(text, pattern, dropped):
    got, note = normalize(text)
    assert got == pattern
    if dropped is None:
        assert note is None
    else:
        assert note is not None and ("path is dropped" in note) == dropped


@pytest.mark.parametrize("bad", ["ftp://x.example", "https://user:pw@x.example", "https://"])
def test_other_url_forms_are_refused_in_one_line(bad):
    with pytest.raises(PolicyError):
        normalize(bad)


@pytest.mark.parametrize("suffix", ["*.co.uk", "*.gov.uk", "*.com.au"])
def test_wildcards_over_an_icann_suffix_are_refused(suffix):
    with pytest.raises(PolicyError, match="covers the public suffix"):
        check((suffix,))


def test_a_single_label_wildcard_is_refused_too():
    with pytest.raises(PolicyError, match="registrable domain"):
        check(("*.com",))


@pytest.mark.parametrize("pattern,named", [
    ("*.github.io", "github.io"), ("*.cloudfront.net", "cloudfront.net"), ("*.googleapis.com", "googleapis.com"),
])
def test_wildcards_over_a_private_suffix_pass_with_a_warning(pattern, named):
    got = check((pattern,))
    assert got.patterns == (pattern,) and len(got.warnings) == 1 and named in got.warnings[0]


def test_a_domain_with_private_suffixes_under_it_warns_and_an_ordinary_one_does_not():
    assert check(("*.amazonaws.com",)).warnings  # s3.amazonaws.com and friends are private suffixes
    ok = check(("*.example.com", "api.github.com", "https://pypi.org"))
    assert ok.patterns == ("*.example.com", "api.github.com", "pypi.org:443") and ok.warnings == ()

"""allow_hosts patterns and Cedar decisions (DESIGN §9; ATTACKS C.2 15, C.7 53)."""

import pytest

from firma.core.policy import HTTP_REQUEST, NETWORK_CONNECT, Policy, Request, parse_pattern
from firma.errors import PolicyError


def req(host, port=443, action=NETWORK_CONNECT, method="CONNECT", path=""):
    return Request(action, host, port, method, path, "agent-1")


def test_exact_wildcard_and_ports():
    p = Policy(["allowed.com", "*.api.example.com", "127.0.0.1:8080", "[::1]:9000"])
    assert p.decide(req("allowed.com", 443)).allowed
    assert p.decide(req("allowed.com", 80)).allowed
    assert not p.decide(req("allowed.com", 8080)).allowed  # default ports only
    assert p.decide(req("x.api.example.com")).allowed
    assert p.decide(req("a.b.api.example.com")).allowed
    assert not p.decide(req("api.example.com")).allowed  # apex is not matched by *.
    for bad in ("allowed.com.evil.com", "evilallowed.com", "xallowed.com", "evilapi.example.com"):
        d = p.decide(req(bad))
        assert not d.allowed and d.reason == "host_not_allowed"
    assert p.decide(req("127.0.0.1", 8080)).exact
    assert not p.decide(req("127.0.0.1", 80)).allowed
    assert p.decide(req("::1", 9000)).allowed


def test_pattern_canonicalization_and_rejections():
    assert parse_pattern("EXAMPLE.com.").host == "example.com"
    assert parse_pattern("127.1:80").host == "127.0.0.1"
    for bad in ("*.com", "*", "a*.example.com", "*example.com", "ex*ample.com", "*.127.0.0.1", "", "host:0", "host:99999", "evil.com\x00", "u@host"):
        with pytest.raises(PolicyError):
            parse_pattern(bad)


def test_default_deny_without_rules():
    d = Policy([]).decide(req("anything.com"))
    assert not d.allowed and d.reason == "host_not_allowed"


CEDAR = """
permit(principal, action == Action::"http.request", resource)
  when { resource.host == "docs.example.com" && resource.method == "GET" };
forbid(principal, action, resource) when { resource.host == "allowed.com" && resource.path like "/admin*" };
forbid(principal, action == Action::"network.connect", resource) when { resource.port == 8443 };
"""


def test_cedar_permit_and_forbid_wins_over_allow_hosts():
    p = Policy(["allowed.com", "allowed.com:8443"], CEDAR)
    assert p.decide(req("docs.example.com", 80, HTTP_REQUEST, "GET", "/x")).allowed
    assert not p.decide(req("docs.example.com", 80, HTTP_REQUEST, "POST", "/x")).allowed
    assert p.decide(req("allowed.com", 80, HTTP_REQUEST, "GET", "/ok")).allowed
    d = p.decide(req("allowed.com", 80, HTTP_REQUEST, "GET", "/admin/users"))
    assert not d.allowed and d.reason == "policy_forbid"
    d = p.decide(req("allowed.com", 8443))
    assert not d.allowed and d.reason == "policy_forbid"


def test_bad_or_empty_cedar_refuses_to_load(tmp_path):
    for text in ("permit(", "", "   \n", "// only a comment\n"):
        with pytest.raises(PolicyError):
            Policy([], text)
    with pytest.raises(PolicyError):
        Policy.load([], str(tmp_path / "missing.cedar"))


def test_version_changes_with_policy():
    assert Policy(["a.com"]).version != Policy(["b.com"]).version
    assert Policy(["a.com", "b.com"]).version == Policy(["b.com", "a.com"]).version

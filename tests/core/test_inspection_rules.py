"""Which TLS destinations are terminated (DESIGN §5.7, firma.core.inspection): the name globs of
`[run].inspect` / `no_inspect` / credential hosts, the order of `why`, and the hosts a Cedar policy
decides per request, read from cedarpy's JSON form of real policy texts.

A policy that is request-level but read as "not" (or as naming fewer hosts than it applies to)
is a fail-open: its rule is never applied over HTTPS to the hosts left out, since those are
tunnelled. The tests for such forms check the Cedar decision too (the rule does decide on the
request there), so the expectation is the policy's own meaning, not a reading of the code."""

from __future__ import annotations

import json

import cedarpy
import pytest

from firma.core.inspection import HostGlob, InspectionRules, PolicyHosts, like_glob, name_glob, policy_hosts, rules
from firma.core.policy import Policy, Request, request_context
from firma.errors import ConfigError

# ------------------------------------------------------------------------------- name_glob


def test_exact_name_matches_only_itself():
    g = name_glob("api.github.com", "inspect")
    assert g.matches("api.github.com")
    for other in ("github.com", "x.api.github.com", "api.github.com.evil.com", "apixgithub.com", "api.github.co"):
        assert not g.matches(other), other


def test_wildcard_matches_subdomains_at_any_depth_never_the_apex():
    g = name_glob("*.example.com", "inspect")
    assert g.matches("a.example.com") and g.matches("a.b.example.com")
    assert not g.matches("example.com")  # the apex is not a subdomain
    assert not g.matches(".example.com")
    assert not g.matches("notexample.com")  # a label boundary, not a string suffix
    assert not g.matches("a.example.com.evil.net")
    # control: the apex written exactly matches the apex
    assert name_glob("example.com", "inspect").matches("example.com")


@pytest.mark.parametrize("text", ["api.github.com:443", "api.github.com:8443", "API.GitHub.COM:1"])
def test_a_port_is_not_part_of_the_choice(text):
    g = name_glob(text, "inspect")
    assert g.matches("api.github.com")
    assert not g.matches("api.github.com:443")  # the port is not glued onto the name either


def test_wildcard_with_a_port():
    g = name_glob("*.example.com:8443", "no_inspect")
    assert g.matches("a.example.com") and not g.matches("example.com")


@pytest.mark.parametrize("text", ["a*.com", "*", "foo.*", "*.*.com", "a.*.com", "**.a.com", "*example.com", "api.*"])
def test_star_anywhere_but_a_whole_leading_label_is_refused(text):
    with pytest.raises(ConfigError) as info:
        name_glob(text, "inspect")
    assert "inspect entry" in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "*.", "a b.com", "a/b.com", "a@b.com"])
def test_unusable_names_are_refused_naming_the_setting(text):
    with pytest.raises(ConfigError) as info:
        name_glob(text, "no_inspect")
    assert str(info.value).startswith("no_inspect entry")


def test_case_and_trailing_dot_are_canonicalised():
    for text in ("API.GitHub.COM", " api.github.com ", "api.github.com."):
        assert name_glob(text, "inspect").matches("api.github.com"), text
    assert name_glob("*.Example.COM.", "inspect").matches("a.example.com")


def test_unicode_names_match_their_idna_form():
    g = name_glob("Bücher.de", "inspect")
    assert g.matches("xn--bcher-kva.de")  # canonical hosts are the A-label form
    assert not g.matches("bücher.de")
    w = name_glob("*.bücher.de", "inspect")
    assert w.matches("shop.xn--bcher-kva.de") and not w.matches("xn--bcher-kva.de")
    # control: the A-label spelling is the same glob
    assert name_glob("xn--bcher-kva.de", "inspect").regex == g.regex


def test_regex_metacharacters_in_names_are_literal():
    g = name_glob("a-b.example.com", "inspect")
    assert not g.matches("a-bxexample.com")
    assert g.matches("a-b.example.com")


# ------------------------------------------------------------------------------- like_glob


def test_like_glob_star_is_any_run_including_dots_and_empty():
    g = like_glob("*.example.com")
    assert g.matches("a.example.com") and g.matches("a.b.example.com") and g.matches(".example.com")
    assert not g.matches("example.com")  # Cedar: the "." is literal
    assert like_glob("*").matches("") and like_glob("*").matches("anything.at.all")
    m = like_glob("api.*.com")
    assert m.matches("api.x.com") and m.matches("api.x.y.com") and m.matches("api..com")
    assert not m.matches("api.x.org")


def test_like_glob_escapes_everything_but_star():
    g = like_glob("a.b+c?.com")
    assert g.matches("a.b+c?.com")
    assert not g.matches("axb+c?.com") and not g.matches("a.bbc.com") and not g.matches("a.b+.com")


# ------------------------------------------------------------------------ InspectionRules.why


def _rules(inspect=(), no_inspect=(), creds=(), policy=PolicyHosts()) -> InspectionRules:
    return rules(inspect, no_inspect, creds, policy)


def test_why_reasons_in_order_inspect_then_credential_then_policy():
    r = _rules(["api.github.com"], [], [("github", "api.github.com"), ("other", "*.github.com")],
               PolicyHosts(hosts=(like_glob("api.github.com"), like_glob("docs.github.com"))))
    assert r.why("api.github.com") == "inspect"
    assert r.why("uploads.github.com") == "credential other"
    assert r.why("docs.github.com") == "credential other"  # a credential outranks the policy
    assert r.why("github.com") is None
    assert _rules(policy=PolicyHosts(hosts=(like_glob("docs.github.com"),))).why("docs.github.com") == "policy"


def test_why_first_bound_credential_is_named():
    r = _rules(creds=[("first", "*.example.com"), ("second", "api.example.com")])
    assert r.why("api.example.com") == "credential first"
    assert r.why("example.com") is None


def test_no_inspect_wins_over_inspect_credentials_and_policy():
    pol = PolicyHosts(any_host=True)
    r = _rules(["*.example.com", "pinned.example.com"], ["pinned.example.com"], [("cred", "pinned.example.com")], pol)
    assert r.why("pinned.example.com") is None
    # controls: without the no_inspect entry each of the three would inspect it
    assert _rules(["pinned.example.com"]).why("pinned.example.com") == "inspect"
    assert _rules(creds=[("cred", "pinned.example.com")]).why("pinned.example.com") == "credential cred"
    assert _rules(policy=pol).why("pinned.example.com") == "policy"
    # and the exemption is exactly that name
    assert r.why("other.example.com") == "inspect"


def test_no_inspect_wildcard_exempts_subdomains_not_the_apex():
    r = _rules(["example.com", "a.example.com"], ["*.example.com"])
    assert r.why("a.example.com") is None
    assert r.why("example.com") == "inspect"


def test_policy_any_host_and_active():
    assert not _rules().active
    assert _rules().why("anything.test") is None
    for r in (_rules(["a.test"]), _rules(creds=[("c", "a.test")]), _rules(policy=PolicyHosts(any_host=True)),
              _rules(policy=PolicyHosts(hosts=(like_glob("a.test"),)))):
        assert r.active
    assert _rules(no_inspect=["a.test"]).active is False  # no_inspect alone inspects nothing


def test_rules_canonicalise_and_deduplicate_and_describe():
    r = _rules(["API.example.com:443", "api.example.com:443"], ["Pinned.Example.com"], [("c", "*.Example.com:8443")])
    assert r.why("api.example.com") == "inspect"
    assert r.why("pinned.example.com") is None
    assert r.why("x.example.com") == "credential c"
    d = r.describe()
    assert d["policy_hosts"] == [] and d["credential_hosts"] == ["c: *.example.com:8443"]
    assert _rules(policy=PolicyHosts(any_host=True)).describe()["policy_hosts"] == ["*"]


def test_rules_refuse_a_bad_credential_host_naming_the_credential():
    with pytest.raises(ConfigError) as info:
        _rules(creds=[("github", "a*.github.com")])
    assert "credentials.github.hosts" in str(info.value)


# -------------------------------------------------------------------- policy_hosts (Cedar JSON)

PERMIT_ALL = 'permit(principal, action, resource);\n'


def ph(text: str) -> PolicyHosts:
    return policy_hosts(json.loads(cedarpy.policies_to_json_str(text)))


def hosts_of(text: str) -> set[str]:
    p = ph(text)
    assert not p.any_host, p
    return {g.text for g in p.hosts}


def matches(p: PolicyHosts, host: str) -> bool:
    return p.any_host or any(g.matches(host) for g in p.hosts)


def decide(text: str, action: str, host: str, path: str = "/", method: str = "GET", query: tuple[str, ...] = ()):
    """Cedar's own answer for a request to host:443 (an HTTPS request as the inspected path asks it)."""
    if action == "network.connect":
        return Policy((), text).decide(Request(action, host, 443, "CONNECT", ""))
    ctx = request_context(inspected=True, scheme="https", query_params=query)
    return Policy((), text).decide(Request(action, host, 443, method, path, context=ctx))


@pytest.mark.parametrize("text, expected", [
    ('forbid(principal, action, resource) when { resource.host == "a.com" && resource.path like "/admin*" };', {"a.com"}),
    ('forbid(principal, action, resource) when { "a.com" == resource.host && resource.path == "/x" };', {"a.com"}),
    ('forbid(principal, action, resource) when { resource.method == "DELETE" && resource.host == "a.com" };', {"a.com"}),
    ('forbid(principal, action, resource) when { resource["path"] == "/x" && resource["host"] == "a.com" };', {"a.com"}),
    ('forbid(principal, action, resource) when { resource has path && resource.host == "a.com" };', {"a.com"}),
    ('forbid(principal, action, resource) when { resource.host == "A.Com" && resource.path == "/x" };', {"a.com"}),
    ('forbid(principal, action, resource) when { ["a.com", "b.com"].contains(resource.host) && resource.path == "/" };',
     {"a.com", "b.com"}),
    ('forbid(principal, action, resource) when { resource.host == "a.com" } unless { resource.path == "/ok" };', {"a.com"}),
    ('forbid(principal, action, resource) when { resource.path == "/x" } when { resource.host == "a.com" };', {"a.com"}),
    ('forbid(principal, action, resource == Resource::"a.com:443") when { resource.path == "/x" };', {"a.com"}),
    ('permit(principal, action == Action::"http.request", resource) when { resource.host == "a.com" };', {"a.com"}),
    ('permit(principal, action == Action::"http.request", resource) when { resource.host == "a.com" && resource.port == 8443 };',
     {"a.com"}),
])
def test_request_level_rules_name_their_host_literals(text, expected):
    assert hosts_of(text) == expected


def test_a_like_host_pattern_becomes_a_glob():
    p = ph('forbid(principal, action, resource) when { resource.host like "*.example.com" && resource.method == "POST" };')
    assert not p.any_host
    assert matches(p, "api.example.com") and matches(p, "a.b.example.com")
    assert not matches(p, "example.com") and not matches(p, "example.org")
    # the pattern is Cedar's: `*` is any run, dots included
    q = ph('forbid(principal, action, resource) when { resource.host like "api.*.com" && resource.path == "/" };')
    assert matches(q, "api.x.y.com") and not matches(q, "www.x.com")


def test_a_host_named_in_a_rule_is_matched_as_the_sidecar_sees_it():
    p = ph('forbid(principal, action, resource) when { resource.host == "a.com" && resource.path == "/x" };')
    assert matches(p, "a.com")
    assert not matches(p, "b.com") and not matches(p, "x.a.com") and not matches(p, "a.com.evil.net")


@pytest.mark.parametrize("text", [
    'forbid(principal, action, resource) when { resource.path like "/admin*" };',
    'forbid(principal, action, resource) when { resource.method == "DELETE" };',
    'forbid(principal, action, resource) when { resource has path };',
    'forbid(principal, action, resource) when { ["/a", "/b"].contains(resource.path) };',
    'permit(principal, action == Action::"http.request", resource);',
    'permit(principal, action == Action::"http.request", resource) when { resource.port == 443 };',
    'forbid(principal, action, resource is Resource) when { resource.path == "/" };',
    'forbid(principal, action, resource in Resource::"a.com:443") when { resource.path == "/x" };',
])
def test_request_level_rules_naming_no_host_count_for_every_host(text):
    assert ph(text).any_host


@pytest.mark.parametrize("text", [
    'forbid(principal, action, resource) when { resource.host != "a.com" && resource.path == "/x" };',
    'forbid(principal, action, resource) when { !(resource.host == "a.com") && resource.path == "/x" };',
    'forbid(principal, action, resource) when { !(resource.host like "*.a.com") && resource.path == "/x" };',
    'forbid(principal, action, resource) when { !(["a.com"].contains(resource.host)) && resource.path == "/x" };',
    'forbid(principal, action, resource) when { resource.path == "/x" } unless { resource.host == "a.com" };',
    'forbid(principal, action, resource) unless { resource.host == "a.com" || resource.path == "/ok" };',
    'forbid(principal, action == Action::"http.request", resource) unless { resource.host == "a.com" };',
])
def test_a_host_only_under_a_negation_counts_for_every_host(text):
    assert ph(text).any_host
    # the rule does apply to another host: that host must be inspected (control on Cedar's side)
    assert not decide(PERMIT_ALL + text, "http.request", "b.com", "/x").allowed


@pytest.mark.parametrize("text", [
    # the host used in a way that is not a literal comparison: it may stand for any host
    'forbid(principal, action, resource) when { resource.host == resource.path };',
    'forbid(principal, action, resource) when { resource.host in ["a.com"] && resource.path == "/" };',
    'forbid(principal, action, resource) when { ["a.com"].containsAny([resource.host]) && resource.path == "/" };',
    'forbid(principal, action, resource) when { resource.host == context.content_type };',
])
def test_a_host_used_otherwise_counts_for_every_host(text):
    assert ph(text).any_host


@pytest.mark.parametrize("text", [
    'forbid(principal, action, resource) when { resource.host == "a.com" };',
    'forbid(principal, action, resource) when { resource.host like "*.a.com" };',
    'permit(principal, action == Action::"network.connect", resource) when { resource.host == "a.com" && resource.port == 443 };',
    'forbid(principal, action, resource) when { resource.port == 8443 };',
    'permit(principal, action in [Action::"http.request", Action::"network.connect"], resource) when { resource.host == "a.com" };',
    'permit(principal == Agent::"x", action, resource) when { resource.host == "a.com" };',
])
def test_connection_level_rules_are_not_request_level(text):
    p = ph(text)
    assert p == PolicyHosts() and not p.any_host and p.hosts == ()
    # control: the same host condition with the request's path added is request-level
    assert ph(text.replace("when {", 'when { resource.path == "/" &&', 1)).hosts or ph(
        text.replace("when {", 'when { resource.path == "/" &&', 1)).any_host


@pytest.mark.parametrize("text", [
    'forbid(principal, action, resource) when { context.query_params.contains("token") };',
    'forbid(principal, action, resource) when { context.inspected == false };',
    'forbid(principal, action, resource) when { context has content_type && context.content_length > 1000 };',
    'forbid(principal, action, resource) unless { context.scheme == "https" };',
])
def test_context_references_are_request_level(text):
    assert ph(text).any_host
    with_host = text.replace("when {", 'when { resource.host == "a.com" &&', 1).replace(
        "unless {", 'when { resource.host == "a.com" } unless {', 1)
    assert hosts_of(with_host) == {"a.com"}


def test_multiple_policies_union_their_hosts():
    text = "\n".join([
        PERMIT_ALL,
        'forbid(principal, action, resource) when { resource.host == "a.com" && resource.path like "/admin*" };',
        'forbid(principal, action, resource) when { resource.host like "*.b.com" && resource.method == "DELETE" };',
        'forbid(principal, action, resource) when { resource.host == "c.com" };',  # connection-level: no inspection
        'forbid(principal, action, resource) when { resource.host == "a.com" && resource.method == "PUT" };',  # duplicate
    ])
    p = ph(text)
    assert not p.any_host
    assert [g.text for g in p.hosts] == ["a.com", "*.b.com"]
    assert matches(p, "a.com") and matches(p, "x.b.com") and not matches(p, "c.com")
    # one request-level rule without a host makes it every host
    assert ph(text + '\nforbid(principal, action, resource) when { resource.path == "/.git" };').any_host


def test_a_policy_set_with_nothing_request_level():
    assert ph(PERMIT_ALL) == PolicyHosts()
    assert ph(PERMIT_ALL + 'forbid(principal, action == Action::"network.connect", resource) when { resource.port == 25 };') \
        == PolicyHosts()


def test_policy_request_hosts_is_the_same_reading():
    text = PERMIT_ALL + 'forbid(principal, action, resource) when { resource.host == "a.com" && resource.path == "/x" };'
    assert Policy((), text).request_hosts() == ph(text)
    assert Policy(("a.com",), None).request_hosts() == PolicyHosts()


def test_host_glob_is_hashable_and_compares_by_value():
    assert like_glob("a.com") == like_glob("a.com") and len({like_glob("a.com"), like_glob("a.com")}) == 1
    assert isinstance(name_glob("a.com", "inspect"), HostGlob)


# ------------------------------------------------ request-level forms read as less than they are
#
# Each of these was a fail-open before it was fixed: Cedar applies the rule to an HTTPS request
# (the control decides so), yet policy_hosts left the host out, so its connections were tunnelled
# and the rule never consulted for them.


# Regression (`_request_level`): the action scope
# `action in [Action::"http.request"]` / `action in Action::"http.request"` is given by cedarpy as
# {"op": "in", "entity": {...}} (one entity, singular key); the code reads `entity` only for
# op "==" and `entities` otherwise, so it finds no action and the rule counts as connection-level.
# It must give hosts {"a.com"}.
@pytest.mark.parametrize("scope", ['action in [Action::"http.request"]', 'action in Action::"http.request"'])
def test_action_in_http_request_is_request_level(scope):
    text = f'forbid(principal, {scope}, resource) when {{ resource.host == "a.com" }};'
    # control: Cedar forbids the request but not the connection, so only inspection can enforce it
    assert not decide(PERMIT_ALL + text, "http.request", "a.com").allowed
    assert decide(PERMIT_ALL + text, "network.connect", "a.com").allowed
    assert hosts_of(text) == {"a.com"}


# Regression (`_request_level`): `action == Action::"http.request"`
# written in a condition (`when { action == Action::"http.request" && resource.host == "a.com" }`)
# is the same rule as the scope form but is read as connection-level (only method/path/context in
# the body count). Expected hosts {"a.com"}; actual PolicyHosts(). Fix: treat a `{"Var": "action"}`
# anywhere in a condition body as request-level (conservative), or recognise `action == / in`
# comparisons naming http.request there.
def test_action_test_in_a_condition_is_request_level():
    text = 'forbid(principal, action, resource) when { action == Action::"http.request" && resource.host == "a.com" };'
    assert not decide(PERMIT_ALL + text, "http.request", "a.com").allowed
    assert decide(PERMIT_ALL + text, "network.connect", "a.com").allowed
    assert hosts_of(text) == {"a.com"}


# Regression (`_policy_host_literals.walk`): a host literal is
# collected wherever it appears outside a negation, including under `||` and in an
# `if … then … else …` condition, where it does not restrict the rule to that host. E.g.
# `forbid … when { resource.host == "a.com" || resource.path like "/admin*" }` forbids
# https://b.com/admin, but policy_hosts returns hosts=(a.com,) so b.com is tunnelled and
# /admin on it is never checked. Expected: any_host=True (or at least b.com matched); actual:
# hosts (a.com) only. Fix: only take host literals from the conjunctive spine of a `when` body
# (`&&` operands, recursively); a host comparison under `||` (unless every disjunct is a host
# comparison), inside `if-then-else`, or anywhere else → return None (every host), as negation does.
@pytest.mark.parametrize("text, path, method, query", [
    ('forbid(principal, action, resource) when { resource.host == "a.com" || resource.path like "/admin*" };',
     "/admin/x", "GET", ()),
    ('forbid(principal, action, resource) when { resource.path like "/admin*" && (resource.host == "a.com" || true) };',
     "/admin/x", "GET", ()),
    ('forbid(principal, action, resource) when { if resource.host == "a.com" then false else resource.path like "/admin*" };',
     "/admin/x", "GET", ()),
    ('forbid(principal, action, resource) when { ["a.com"].contains(resource.host) || resource.method == "DELETE" };',
     "/", "DELETE", ()),
    ('forbid(principal, action, resource) when { resource.host like "*.a.com" || context.query_params.contains("x") };',
     "/", "GET", ("x",)),
])
def test_host_literal_in_a_disjunction_does_not_restrict_the_rule(text, path, method, query):
    # control: Cedar applies the rule to an HTTPS request to b.com, but not to its connection
    assert not decide(PERMIT_ALL + text, "http.request", "b.com", path, method, query).allowed
    assert decide(PERMIT_ALL + text, "network.connect", "b.com").allowed
    assert matches(ph(text), "b.com")


# Positive controls for the three bugs above: the forms the module does handle.
def test_controls_for_the_bug_forms():
    assert hosts_of('forbid(principal, action == Action::"http.request", resource) when { resource.host == "a.com" };') \
        == {"a.com"}
    assert hosts_of('forbid(principal, action, resource) when { resource.host == "a.com" && resource.path like "/admin*" };') \
        == {"a.com"}
    assert ph('forbid(principal, action, resource) when { !(resource.host == "a.com") || resource.path like "/admin*" };').any_host


def test_resource_reached_through_a_record_counts_for_every_host():
    """`{a: resource}.a.path` is a path rule too: `resource` used any way but `.host` / `.port`
    makes a rule request-level, and with no host it names, it counts for every host."""
    text = 'forbid(principal, action, resource) when { {a: resource}.a.path like "/admin*" };'
    assert not decide(PERMIT_ALL + text, "http.request", "b.com", "/admin/x", "GET", ()).allowed  # control
    assert ph(text).any_host


@pytest.mark.parametrize("text", ["a.com:x", "a.com:0", "a.com:70000", "a.com:*"])
def test_a_bad_port_in_an_inspection_entry_is_refused(text):
    with pytest.raises(ConfigError, match="port"):
        name_glob(text, "inspect")
    assert name_glob("a.com:443", "inspect").matches("a.com")  # control: a good port is ignored


def test_a_bracketed_ipv6_entry_with_a_port_is_read():
    assert name_glob("[::1]:443", "inspect").matches("::1")

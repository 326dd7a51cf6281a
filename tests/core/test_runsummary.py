"""The run summary's counting and flags (pure)."""

from firma.core.runsummary import allow_flag, render, summarize

SBX = "sbx_" + "a" * 32


def ev(action, resource, reason, sbx=SBX, decision=2, **kw):
    return {"action": action, "resource": resource, "deny_reason": reason, "decision": decision, "sandbox_id": sbx, **kw}


def test_flags_are_exact_where_the_policy_needs_exact():
    assert allow_flag("pypi.org", 443, "host_not_allowed") == ("--allow-host pypi.org", "")
    assert allow_flag("pypi.org", 8443, "host_not_allowed") == ("--allow-host pypi.org:8443", "")
    assert allow_flag("::1", 8080, "host_not_allowed")[0] == "--allow-host [::1]:8080"
    flag, why = allow_flag("intranet.example", 443, "blocked_address")
    assert flag == "--allow-host intranet.example:443" and "non-public" in why
    assert allow_flag("x.example", 443, "policy_forbid") == (None, "a Cedar forbid rule in your policy denies it; change the policy")


def test_counts_only_this_sandbox_and_reads_urls_and_authorities():
    s = summarize([
        ev("http.request", "http://a.example/x", "host_not_allowed"),
        ev("http.request", "https://a.example/y", "host_not_allowed"),
        ev("network.connect", "a.example:443", "host_not_allowed"),
        ev("network.connect", "b.example:443", "host_not_allowed", sbx="sbx_" + "b" * 32),
        ev("network.connect", "c.example:443", "", decision=1),
        ev("dns.query", "q.example A", "dns_refused"),
        ev("http.malformed", "", "bad_chunk"),
        ev("network.connect", "d.example:443", "suppressed:5:host_not_allowed"),
    ], sandbox_id=SBX, exit_status=0)
    got = {(d.host, d.port): d.count for d in s.denied}
    assert got == {("a.example", 80): 1, ("a.example", 443): 2, ("d.example", 443): 5}
    assert s.dns_refused == {"q.example": 1} and s.other_denials == {"bad_chunk": 1}
    assert s.denied_total == 9 and s.suppressed == 5
    text = render(s)
    assert "a.example:443  ×2" in text and "allow with: --allow-host a.example" in text and "bad_chunk" in text


def test_nothing_denied_says_so_and_monitor_says_would_have():
    assert "nothing was denied" in render(summarize([], sandbox_id=SBX, exit_status=0))
    s = summarize([ev("network.connect", "a.example:443", "host_not_allowed")], sandbox_id=SBX, exit_status=0, monitor=True)
    assert "would have been denied" in render(s) and "monitor mode" in render(s)

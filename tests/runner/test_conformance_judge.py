"""Pure judgement rules: a silent probe only counts when its positive control was live."""

from __future__ import annotations

from firma.runner.conformance.judge import (
    Report,
    RunObservation,
    judge_dns_confined,
    judge_fail_closed_startup,
    judge_sidecar_only_egress,
)

TOKEN = "tok123"


def egress_obs(side, nonce, *, via=True, trap=False, direct=False, up_paths=(), trap_items=(), deny=True):
    return RunObservation(
        side=side, nonce=nonce, exit_code=0, evidence_file=f"/e/{nonce}.json",
        evidence={
            "via_proxy": {"ok": via, "status": 200 if via else None, "body": f"x {TOKEN}" if via else "", "error": None},
            "via_proxy_denied": {"ok": False, "status": 403 if deny else None,
                                 "body": '{"denied": true}' if deny else "", "error": None},
            "direct_trap": {"connected": trap, "error": None if trap else "refused"},
            "direct_upstream": {"ok": direct, "status": 200 if direct else None, "error": None},
        },
        upstream_paths=tuple(up_paths), trap_tcp=tuple(trap_items),
    )


def live_control():
    return egress_obs("control", "c1", trap=True, direct=True,
                      up_paths=("/egress/c1/proxied", "/egress/c1/direct"), trap_items=(b"egress-c1",))


def test_confined_runner_passes_with_live_control():
    inside = egress_obs("runner", "r1", up_paths=("/egress/r1/proxied",))
    r = judge_sidecar_only_egress(live_control(), inside, TOKEN)
    assert r.ok, r.evidence
    assert r.files == ("/e/c1.json", "/e/r1.json")


def test_dead_control_fails_even_when_runner_looks_confined():
    # e.g. the trap listener was not reachable at all: silence inside would prove nothing.
    control = egress_obs("control", "c1", trap=False, direct=True, up_paths=("/egress/c1/proxied", "/egress/c1/direct"))
    inside = egress_obs("runner", "r1", up_paths=("/egress/r1/proxied",))
    r = judge_sidecar_only_egress(control, inside, TOKEN)
    assert not r.ok and r.evidence.startswith("positive control failed")


def test_far_side_arrival_fails_even_if_probe_claims_it_was_blocked():
    inside = egress_obs("runner", "r1", trap=False, up_paths=("/egress/r1/proxied",), trap_items=(b"egress-r1",))
    r = judge_sidecar_only_egress(live_control(), inside, TOKEN)
    assert not r.ok and "nothing reached the trap listener" in r.evidence


def test_missing_evidence_fails():
    inside = RunObservation(side="runner", nonce="r1", exit_code=0)
    r = judge_sidecar_only_egress(live_control(), inside, TOKEN)
    assert not r.ok and "probe ran and wrote evidence" in r.evidence


def test_proxy_that_is_not_the_sidecar_fails():
    # A runner relaying to some other proxy: the allowed request works, the disallowed one is not
    # answered with the sidecar's deny.
    inside = egress_obs("runner", "r1", up_paths=("/egress/r1/proxied",), deny=False)
    r = judge_sidecar_only_egress(live_control(), inside, TOKEN)
    assert not r.ok and "policy sidecar" in r.evidence


def test_proxied_request_must_reach_upstream_not_only_be_claimed():
    inside = egress_obs("runner", "r1", up_paths=())
    assert not judge_sidecar_only_egress(live_control(), inside, TOKEN).ok


def test_dns_requires_stub_to_see_the_query():
    control = RunObservation(side="control", nonce="c", exit_code=0, evidence={"explicit_udp": {"reply": True}},
                             trap_udp=(b"..explicit-c..",))
    ev = {"explicit_udp": {"reply": False}, "getaddrinfo": {"ran": True, "name": "probe-r.conformance.invalid",
                                                          "addresses": [], "error": "gaierror"}}
    seen = RunObservation(side="runner", nonce="r", exit_code=0, evidence=ev, dns_queries=("probe-r.conformance.invalid",))
    unseen = RunObservation(side="runner", nonce="r", exit_code=0, evidence=ev, dns_queries=())
    assert judge_dns_confined(control, seen).ok
    assert not judge_dns_confined(control, unseen).ok


def test_startup_passes_only_if_command_never_ran():
    ok_ctl = RunObservation(side="control", nonce="c", exit_code=0, evidence={"started": True})
    ok_run = RunObservation(side="control", nonce="c2", exit_code=0, evidence={"started": True})
    refused = RunObservation(side="runner", nonce="r", exit_code=1)
    ran = RunObservation(side="runner", nonce="r", exit_code=1, evidence={"started": True})
    assert judge_fail_closed_startup(ok_ctl, ok_run, refused).ok
    assert not judge_fail_closed_startup(ok_ctl, ok_run, ran).ok
    # A runner that refuses everything does not pass: its control (live services) must start.
    dead_ctl = RunObservation(side="control", nonce="c2", exit_code=1)
    assert not judge_fail_closed_startup(ok_ctl, dead_ctl, refused).ok


def test_empty_report_is_not_a_pass():
    assert not Report("/r", "/e", ()).ok

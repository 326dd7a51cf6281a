"""Facts that must be spelled once: where a copy is unavoidable, the copies agree, and the one
grammar accepts and refuses what each caller relied on."""

from __future__ import annotations

import pytest

from firma.core import launchenv, wire
from firma.core.endpoint import parse_endpoint, validate_endpoint
from firma.errors import ConfigError, SidecarError
from firma.runner.conformance import probes


def test_the_standalone_probe_script_uses_the_same_proxy_variables():
    assert probes.PROXY_VARS == launchenv.PROXY_VARS


def test_attribution_headers_round_trip():
    hdrs = wire.attribution_headers(sandbox_id="sbx_1", session_id="s", profile="generic", agent_id="a", user="u")
    assert list(hdrs) == sorted(wire.ATTRIBUTION_HEADERS)
    got = wire.attribution_of(hdrs.get)
    assert (got.sandbox_id, got.session_id, got.agent_id, got.profile) == ("sbx_1", "s", "a", "generic")
    assert wire.attribution_of({wire.SANDBOX_ID: "x" * 500}.get).sandbox_id == "x" * 128  # capped


def test_deny_response_names_its_reason():
    raw = wire.deny_response(403, "host_not_allowed", "nope")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"x-firma-deny-reason: host_not_allowed" in head
    assert b"content-length: %d" % len(body) in head


@pytest.mark.parametrize("ep, want", [
    ("tcp://127.0.0.1:9000", ("tcp", ("127.0.0.1", 9000))),
    ("tcp://[::1]:9000", ("tcp", ("::1", 9000))),
    ("tcp://side-car.internal:1/", ("tcp", ("side-car.internal", 1))),
    ("unix:///run/firma.sock", ("unix", "/run/firma.sock")),
])
def test_endpoint_grammar_accepts(ep, want):
    assert parse_endpoint(ep) == want
    assert validate_endpoint(f" {ep} ") == ep


@pytest.mark.parametrize("ep", [
    "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://:80", "tcp://h:", "tcp://h p:80", "tcp://h:80/x",
    "unix://rel.sock", "unix:///", "http://127.0.0.1:80", "127.0.0.1:80", "tcp://[::1:80",
])
def test_endpoint_grammar_refuses(ep):
    with pytest.raises(SidecarError):
        parse_endpoint(ep)
    with pytest.raises(ConfigError, match="expected local, tcp://HOST:PORT or unix:///PATH"):
        validate_endpoint(ep)


def test_port_zero_only_for_a_listen_address():
    assert parse_endpoint("tcp://127.0.0.1:0", listen=True) == ("tcp", ("127.0.0.1", 0))
    assert validate_endpoint("local") == "local"

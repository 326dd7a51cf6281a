"""Cedar path rules decide on the path's normal form (DESIGN §9 "Policy"): spellings that name
another path than they look like are refused, what reaches the upstream is checked, and an
IP-literal tunnel cannot carry requests past the path rules. The untricked request is the
control each time."""

from __future__ import annotations

import asyncio

import pytest

from test_sidecar_connect import open_tunnel
from upstreams import HttpUpstream, Stack, run, send_raw

FORBID_ADMIN = """
permit(principal, action, resource);
forbid(principal, action, resource) when { resource.path like "/admin*" };
"""
ONLY_PUBLIC = """
permit(principal, action, resource);
forbid(principal, action == Action::"http.request", resource) unless { resource.path like "/public/*" };
"""

CASES = [
    # (policy, path sent, expected deny reason, or None when it must reach the upstream)
    (FORBID_ADMIN, "/public/x", None),  # control
    (FORBID_ADMIN, "/admin", "policy_forbid"),
    (FORBID_ADMIN, "/./admin", "ambiguous_path"),
    (FORBID_ADMIN, "//admin", "ambiguous_path"),
    (FORBID_ADMIN, "/public/../admin", "ambiguous_path"),
    (FORBID_ADMIN, "/%61dmin", "policy_forbid"),  # decided on the decoded form, not ambiguous
    (ONLY_PUBLIC, "/public/a.txt", None),  # control
    (ONLY_PUBLIC, "/public/../secret.txt", "ambiguous_path"),
    (ONLY_PUBLIC, "/public/%2e%2e/secret.txt", "ambiguous_path"),
    (ONLY_PUBLIC, "/public/%2E%2E/secret.txt", "ambiguous_path"),
    (ONLY_PUBLIC, "/secret.txt", "policy_forbid"),
    (ONLY_PUBLIC, "/public%2F..%2Fsecret.txt", "policy_forbid"),  # %2F stays encoded: not /public/*
]


@pytest.mark.parametrize("policy,path,reason", CASES)
def test_path_spellings_against_like_rules(tmp_path, policy, path, reason):
    async def main():
        up = await HttpUpstream(body=b"ok").start()
        # the exact allow lets a loopback upstream be reached; the Cedar rules then decide
        async with Stack(tmp_path, policy_text=policy, allow=[f"127.0.0.1:{up.port}"], bridge=False) as s:
            resp = await send_raw(s.sidecar_port, f"GET http://127.0.0.1:{up.port}{path} HTTP/1.1\r\n"
                                                  f"Host: 127.0.0.1:{up.port}\r\nConnection: close\r\n\r\n".encode())
        up.server.close()
        return resp, [h.target for h, _ in up.rec.requests]

    resp, arrived = run(main())
    if reason is None:
        assert resp.startswith(b"HTTP/1.1 200") and arrived == [path]  # forwarded byte for byte
    else:
        assert f"x-firma-deny-reason: {reason}".encode() in resp, resp[:300]
        assert arrived == []


def test_requests_inside_an_ip_literal_tunnel_are_decided_one_by_one(tmp_path):
    """`curl -p http://IP/admin`: with path rules, each request in a tunnel to an address is
    decided like a proxy request — path normalised, Host checked — and TLS, which cannot be seen
    into, is refused. Control: without path rules the same tunnel carries /admin."""
    from test_tls_hello_and_framing import client_hello

    async def attempt(policy, payloads):
        up = await HttpUpstream(body=b"ok").start()
        out = []
        async with Stack(tmp_path / ("rules" if policy else "none"), policy_text=policy,
                         allow=[f"127.0.0.1:{up.port}"]) as s:
            for payload in payloads:
                r, w, line = await open_tunnel(s.bridge_port, f"127.0.0.1:{up.port}")
                w.write(payload.replace(b"PORT", str(up.port).encode()))
                await w.drain()
                try:
                    out.append(await asyncio.wait_for(r.read(4096), 10))
                finally:
                    w.close()
        up.server.close()
        return out, [h.target for h, _ in up.rec.requests], s

    def req(path, host="127.0.0.1:PORT"):
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    (tmp_path / "rules").mkdir()
    (tmp_path / "none").mkdir()
    payloads = [req("/public/x"), req("/admin"), req("/./admin"), req("/public/x", host="evil.test"),
                client_hello("127.0.0.1")]
    out, arrived, s = run(attempt(FORBID_ADMIN, payloads))
    assert arrived == ["/public/x"]  # only the allowed request reached the upstream
    assert out[0].startswith(b"HTTP/1.1 200")
    assert b"x-firma-deny-reason: policy_forbid" in out[1]
    assert b"x-firma-deny-reason: ambiguous_path" in out[2]
    assert b"x-firma-deny-reason: host_mismatch" in out[3]
    assert out[4] == b""
    assert "tls_needs_inspection" in [e["deny_reason"] for e in s.events()]
    out, arrived, s = run(attempt(None, [req("/admin")]))  # control
    assert arrived == ["/admin"] and out[0].startswith(b"HTTP/1.1 200")

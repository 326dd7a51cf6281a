"""Bridge → sidecar → loopback upstream: attribution stamping, smuggling, pipelining, malformed
heads audited (DESIGN §3, §9; ATTACKS C.2 16, 19-20, C.8 56, 60)."""

import asyncio
import shutil
import subprocess

import pytest

from firma.core.wire import ATTRIBUTION_HEADERS

from upstreams import ATTR, HttpUpstream, Stack, run, send_raw, split_responses


def test_spoofed_attribution_replaced_and_audit_shows_real_sandbox(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"x").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            req = (
                f"GET http://127.0.0.1:{up.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n"
                "X-Firma-Sandbox-Id: sbx_other\r\nx-firma-sandbox-id: sbx_other2\r\nX-FIRMA-SESSION-ID: forged\r\n"
                "x-Firma-Agent: forged\r\nX-Firma-User: root\r\nx-firma-profile: forged\r\nConnection: close\r\n\r\n"
            ).encode()
            r = await send_raw(s.bridge_port, req)
            r2 = await send_raw(s.bridge_port, b"GET http://denied.test/ HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_other\r\n\r\n")
        await up.aclose()
        return r, r2, up, s

    r, r2, up, s = run(main())
    assert r.endswith(b"x")
    (h, _), = up.rec.requests
    assert not any(k.lower() in ATTRIBUTION_HEADERS for k, _ in h.headers)  # stripped before upstream
    evs = s.events()
    assert [e["sandbox_id"] for e in evs] == [ATTR["x-firma-sandbox-id"]] * 2
    assert {e["session_id"] for e in evs} == {"sess-real"} and {e["agent_id"] for e in evs} == {"generic"}
    assert "sbx_other" not in open(s.audit_path).read()


def test_pipelined_second_request_to_denied_host_is_denied_and_never_dialed(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"first").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            req = (
                f"GET http://127.0.0.1:{up.port}/one HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n\r\n"
                f"GET http://127.0.0.1:{up.port + 1 if up.port < 65535 else 1}/two HTTP/1.1\r\n\r\n"
                f"GET http://127.0.0.1:{up.port}/three HTTP/1.1\r\n\r\n"
            ).encode()
            r = await send_raw(s.bridge_port, req)
        await up.aclose()
        return r, up, s

    r, up, s = run(main())
    resps = split_responses(r)
    assert [h.status for h, _ in resps] == [200, 403]
    assert resps[1][0].get_all("x-firma-deny-reason") == ["host_not_allowed"]
    assert [h.target for h, _ in up.rec.requests] == ["/one"]  # /three never forwarded after the deny
    assert [e["decision"] for e in s.events()] == [1, 2]


def test_pipelined_allowed_requests_each_decided_in_order(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"ok").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            one = f"POST http://127.0.0.1:{up.port}/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nHELLO"
            two = f"POST http://127.0.0.1:{up.port}/b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            three = f"GET http://127.0.0.1:{up.port}/c HTTP/1.1\r\nConnection: close\r\n\r\n"
            r = await send_raw(s.bridge_port, (one + two + three).encode())
        await up.aclose()
        return r, up, s

    r, up, s = run(main())
    assert [h.status for h, _ in split_responses(r)] == [200, 200, 200]
    assert [(h.target, b) for h, b in up.rec.requests] == [("/a", b"HELLO"), ("/b", b"3\r\nabc\r\n0\r\n\r\n"), ("/c", b"")]
    assert [e["resource"].rsplit("/", 1)[1] for e in s.events()] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"POST http://H/ HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "cl_te_conflict"),
        (b"POST http://H/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", "cl_te_conflict"),
        (b"POST http://H/ HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", "bad_transfer_encoding"),
        (b"POST http://H/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "bad_content_length"),
        (b"GET http://H/ HTTP/1.1\r\nX-Bad: \xc3\x28\r\n\r\n", "non_utf8_head"),
        (b"GET http://H/ HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", "malformed_request"),
        (b"GET http://H/ HTTP/1.1\r\nX: " + b"a" * (128 * 1024) + b"\r\n\r\n", "head_too_large"),
    ],
)
def test_smuggling_and_malformed_heads_closed_and_audited(tmp_path, raw, reason):
    async def main():
        up = await HttpUpstream().start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            data = raw.replace(b"http://H/", f"http://127.0.0.1:{up.port}/".encode())
            r = await send_raw(s.bridge_port, data)
        await up.aclose()
        return r, up, s

    r, up, s = run(main())
    (h, _body), = split_responses(r)
    assert h.status == 400 and h.get_all("x-firma-deny-reason") == [reason]
    assert up.rec.connections == 0  # nothing reached the upstream
    (ev,) = s.events()
    assert ev["decision"] == 2 and ev["deny_reason"] == reason and ev["sandbox_id"] == ATTR["x-firma-sandbox-id"]


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n", b"-1\r\n", b"3\nabc\r\n0\r\n\r\n"])
def test_bad_chunk_sizes_never_complete_upstream(tmp_path, chunks):
    async def main():
        up = await HttpUpstream().start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            head = f"POST http://127.0.0.1:{up.port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            await send_raw(s.bridge_port, head + chunks + f"GET http://127.0.0.1:{up.port}/smuggled HTTP/1.1\r\n\r\n".encode())
        await up.aclose()
        return up, s

    up, s = run(main())
    assert up.rec.requests == []  # no complete request, and never the smuggled one
    assert b"smuggled" not in up.rec.raw
    (ev,) = s.events()
    assert ev["decision"] == 3 and ev["deny_reason"] == "bad_chunk" and ev["sandbox_id"] == ATTR["x-firma-sandbox-id"]


def test_two_sandboxes_never_cross_attributed(tmp_path):
    """ATTACKS C.8 60: two bridges (two sandboxes) on one sidecar, interleaved traffic."""

    async def main():
        from firma.services.bridge import Bridge

        up = await HttpUpstream().start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"], bridge=False) as s:
            bridges = [Bridge(sidecar_endpoint=s.endpoint, attribution=dict(ATTR, **{"x-firma-sandbox-id": f"sbx_{i}"})) for i in range(2)]
            ports = [await b.serve_address() for b in bridges]
            jobs = []
            for k in range(20):
                i = k % 2
                jobs.append(send_raw(ports[i], f"GET http://127.0.0.1:{up.port}/from{i} HTTP/1.1\r\nX-Firma-Sandbox-Id: sbx_{1 - i}\r\nConnection: close\r\n\r\n".encode()))
            await asyncio.gather(*jobs)
            for b in bridges:
                await b.aclose()
        await up.aclose()
        return s

    s = run(main())
    evs = s.events()
    assert len(evs) == 20
    for e in evs:
        assert e["resource"].endswith("/from" + e["sandbox_id"][-1])


def test_curl_through_the_bridge(tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl is required for this test (apt-get install curl)"

    async def main():
        up = await HttpUpstream(body=b"curl-ok").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            proc = await asyncio.create_subprocess_exec(
                curl, "-sS", "-x", f"http://127.0.0.1:{s.bridge_port}", f"http://127.0.0.1:{up.port}/c",
                "-H", "X-Firma-Sandbox-Id: spoof", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            out, err = await proc.communicate()
            proc2 = await asyncio.create_subprocess_exec(
                curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{s.bridge_port}", "http://evil.test/",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            out2, _ = await proc2.communicate()
        await up.aclose()
        return out, err, out2, s

    out, err, out2, s = run(main())
    assert out == b"curl-ok", err
    assert out2 == b"403"
    assert [e["sandbox_id"] for e in s.events()] == [ATTR["x-firma-sandbox-id"]] * 2


@pytest.mark.parametrize("greeting", [b"\x05\x01\x00", b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x16\x03\x01\x00\x10"])
def test_socks_or_tls_to_the_proxy_port_refused_at_once(tmp_path, greeting):
    """ATTACKS C.2 21: SOCKS (no auth) and raw TLS are refused promptly and audited."""

    async def main():
        async with Stack(tmp_path) as s:
            r = await send_raw(s.bridge_port, greeting, timeout=5)
        return r, s

    r, s = run(main())
    assert r.startswith(b"HTTP/1.1 400") and b"malformed_request" in r
    (ev,) = s.events()
    assert ev["deny_reason"] == "malformed_request" and ev["sandbox_id"] == ATTR["x-firma-sandbox-id"]


def test_pipelined_malformed_after_valid_gets_response_then_audited_400(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"one").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            req = (f"GET http://127.0.0.1:{up.port}/1 HTTP/1.1\r\n\r\n".encode()
                   + f"GET http://127.0.0.1:{up.port}/2 HTTP/1.1\r\nX: \xff\r\n\r\n".encode("latin-1"))
            r = await send_raw(s.bridge_port, req)
        await up.aclose()
        return r, up, s

    r, up, s = run(main())
    resps = split_responses(r)
    assert [h.status for h, _ in resps] == [200, 400] and resps[0][1] == b"one"
    assert [h.target for h, _ in up.rec.requests] == ["/1"]
    assert [(e["decision"], e["deny_reason"]) for e in s.events()] == [(1, ""), (2, "non_utf8_head")]


def test_empty_line_after_a_body_is_tolerated(tmp_path):
    async def main():
        up = await HttpUpstream(body=b"ok").start()
        async with Stack(tmp_path, allow=[f"127.0.0.1:{up.port}"]) as s:
            req = (f"POST http://127.0.0.1:{up.port}/a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\r\n"
                   f"GET http://127.0.0.1:{up.port}/b HTTP/1.1\r\nConnection: close\r\n\r\n").encode()
            r = await send_raw(s.bridge_port, req)
        await up.aclose()
        return r, up

    r, up = run(main())
    assert [h.status for h, _ in split_responses(r)] == [200, 200]
    assert [(h.target, b) for h, b in up.rec.requests] == [("/a", b"hi"), ("/b", b"")]

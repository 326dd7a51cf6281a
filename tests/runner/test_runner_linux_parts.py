"""Parts of the reference runner that need no sandbox: the contract → envelope mapping, the
fail_closed_startup reachability check and the byte relays (served here on host loopback sockets
standing in for planted ones; the real planted path is exercised by the conformance tests)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct

import pytest

from firma.backends.base import PlantedSockets
from firma.core.model import IdentityMode
from firma.errors import ContractError
from firma.runner.linux import (
    Relays,
    Upstreams,
    check_upstreams,
    envelope_from_contract,
    sandbox_env,
    upstreams_from_contract,
)

from test_contract_validate import good_contract  # same directory (rootdir import mode)


def test_proxy_variables_name_the_planted_endpoint():
    c = good_contract()
    c["command"]["env"].update({"https_proxy": "http://127.0.0.1:40001/", "FIRMA_DNS_STUB_ADDR": "127.0.0.1:40002",
                                "OTHER": "keep"})
    env = sandbox_env(c)
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:18080"
    assert env["FIRMA_DNS_STUB_ADDR"] == "127.0.0.1:53"
    assert env["OTHER"] == "keep" and env["HOME"] == "/home/dev"


def test_envelope_from_contract():
    c = good_contract()
    env = envelope_from_contract(c, "/tmp/rt")
    assert env.executable == "/usr/bin/python3" and env.args == ("-c", "print(1)")
    assert env.identity_mode is IdentityMode.SANDBOX_USER
    assert env.network.proxy_url == "http://127.0.0.1:18080"
    assert env.network.dns_stub_addr == "127.0.0.1:53"
    assert env.network.attribution_headers["x-firma-sandbox-id"] == c["sandbox_id"]
    assert env.mounts[0].source == "/home/dev/project" and env.runtime_dir == "/tmp/rt"
    assert [i.name for i in env.invariants][0] == "sidecar_only_egress"
    assert env.home == "/home/dev" and ".ssh" in env.mask_home_paths and ".aws" in env.mask_home_paths
    assert upstreams_from_contract(c) == Upstreams(("127.0.0.1", 40001), ("127.0.0.1", 40002))


@pytest.mark.parametrize(
    "key,value",
    [("proxy_url", "http://10.0.0.1:8080"), ("proxy_url", "http://localhost:8080"), ("dns_stub_addr", "192.0.2.1:53")],
)
def test_reference_runner_only_relays_to_loopback(key, value):
    c = good_contract()
    c["network"][key] = value
    with pytest.raises(ContractError, match="not a loopback IP address"):
        upstreams_from_contract(c)


def _dead_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_startup_check_fails_on_dead_endpoints():
    dead = _dead_port()
    port = dead.getsockname()[1]
    checks = check_upstreams(Upstreams(("127.0.0.1", port), ("127.0.0.1", port)), timeout=2)
    assert [c.name for c in checks] == ["bridge_reachable", "dns_stub_reachable"]
    assert not any(c.ok for c in checks)
    dead.close()


def _udp_refuser():
    """A tiny DNS-ish responder: flips QR and sets REFUSED."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    return u


async def _serve_udp_refused(u: socket.socket, seen: list):
    loop = asyncio.get_running_loop()

    class P(asyncio.DatagramProtocol):
        def connection_made(self, t):
            self.t = t

        def datagram_received(self, d, a):
            seen.append(d)
            self.t.sendto(d[:2] + bytes([d[2] | 0x80, 0x05]) + d[4:], a)

    t, _ = await loop.create_datagram_endpoint(P, sock=u)
    return t


def _planted_standins():
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    dns_tcp = socket.socket()
    dns_tcp.bind(("127.0.0.1", 0))
    dns_tcp.listen(16)
    dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_udp.bind(("127.0.0.1", 0))
    return PlantedSockets(proxy_tcp=tcp, dns_udp=dns_udp, dns_tcp=dns_tcp)


def test_relays_forward_bytes_and_close_when_the_bridge_is_gone():
    async def main():
        # The "bridge": echoes what it gets, prefixed, then closes.
        got = []

        async def bridge_handler(r, w):
            data = await r.read(100)
            got.append(data)
            w.write(b"bridge:" + data)
            await w.drain()
            w.close()

        bridge = await asyncio.start_server(bridge_handler, "127.0.0.1", 0)
        bport = bridge.sockets[0].getsockname()[1]
        stub_sock = _udp_refuser()
        seen: list = []
        stub_t = await _serve_udp_refused(stub_sock, seen)
        up = Upstreams(("127.0.0.1", bport), stub_sock.getsockname()[:2])
        assert all(c.ok for c in await asyncio.to_thread(check_upstreams, up, 2))
        planted = _planted_standins()
        paddr = planted.proxy_tcp.getsockname()
        uaddr = planted.dns_udp.getsockname()
        relays = Relays(up)
        await relays.serve(planted)

        r, w = await asyncio.open_connection(*paddr)
        w.write(b"GET / HTTP/1.1\r\n\r\n")
        await w.drain()
        assert await r.read() == b"bridge:GET / HTTP/1.1\r\n\r\n"
        w.close()

        # DNS over UDP through the relay reaches the stub and the answer comes back.
        loop = asyncio.get_running_loop()
        answer = loop.create_future()

        class C(asyncio.DatagramProtocol):
            def datagram_received(self, d, a):
                answer.set_result(d)

        ct, _ = await loop.create_datagram_endpoint(C, remote_addr=uaddr)
        q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x01x\x00" + struct.pack("!HH", 1, 1)
        ct.sendto(q)
        reply = await asyncio.wait_for(answer, 10)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 5 and seen[-1] == q  # [0]: startup check
        ct.close()

        # Kill the bridge: the relay has nowhere to go and the agent's connection just closes.
        bridge.close()
        await bridge.wait_closed()
        r, w = await asyncio.open_connection(*paddr)
        w.write(b"GET /after HTTP/1.1\r\n\r\n")
        await w.drain()
        assert await r.read() == b""
        w.close()
        assert [g for g in got if g] == [b"GET / HTTP/1.1\r\n\r\n"]  # b"": startup check

        await relays.aclose()
        stub_t.close()

    asyncio.run(main())


def test_runtime_dir_is_firmas_so_its_state_root_is_hidden(tmp_path):
    """With firma's own runtime_dir the bwrap plan masks <runtime_dir>/../.. — firma's state root
    with the audit key, proofs and the contract itself — wherever FIRMA_STATE_DIR points."""
    from firma.backends.bwrap.backend import BwrapBackend
    from firma.backends.bwrap.facts import measure_facts
    from firma.host import detect_host
    from firma.runner.linux import choose_runtime_dir

    state = tmp_path / "state"
    c = good_contract()
    rt_path = state / "run" / c["sandbox_id"]
    rt_path.mkdir(parents=True, mode=0o700)
    (rt_path / "run.log").write_text("firma's\n")
    (state / "audit.key").write_text("KEY")
    c["runtime_dir"] = str(rt_path)
    c["command"]["cwd"] = str(tmp_path)
    c["mounts"] = []
    rt = choose_runtime_dir(c)
    assert rt.path == str(rt_path) and rt.temp_root is None
    env = envelope_from_contract(c, rt.path)
    host = detect_host()
    assert measure_facts(env, host).state_root == str(state)
    plan = BwrapBackend(host).plan_for(env)
    # Masked itself, or under a masked path (here /tmp, already a fresh tmpfs).
    assert any(str(state) == m or str(state).startswith(m.rstrip("/") + "/") for m in plan.masked), plan.masked
    # Cleanup removes what the run added, never firma's files.
    (rt_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    rt.cleanup()
    assert sorted(os.listdir(rt_path)) == ["run.log"]


def test_runtime_dir_not_private_is_refused(tmp_path):
    from firma.errors import LaunchError
    from firma.runner.linux import choose_runtime_dir

    c = good_contract()
    d = tmp_path / "rt"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    c["runtime_dir"] = str(d)
    with pytest.raises(LaunchError, match="mode 0700"):
        choose_runtime_dir(c)


def test_missing_runtime_dir_gets_a_private_temp_tree(tmp_path):
    from firma.runner.linux import choose_runtime_dir

    c = good_contract()
    c["runtime_dir"] = str(tmp_path / "absent")
    rt = choose_runtime_dir(c)
    assert rt.temp_root and rt.path == os.path.join(rt.temp_root, "run", c["sandbox_id"])
    assert stat.S_IMODE(os.stat(rt.path).st_mode) == 0o700
    rt.cleanup()
    assert not os.path.exists(rt.temp_root)

"""The lifecycle is generic: HOST_LOOPBACK routing (vz, runner) starts the bridge and DNS stub on
127.0.0.1 ephemeral ports and hands them to the backend in the envelope; gates refuse before
anything starts. Driven in-process with a tiny fake backend."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys

import pytest

from linux_support import Upstream

from firma.backends.base import RoutingMode, RoutingPlan
from firma.core import config as cfgmod
from firma.core.model import EnforcementProof, NetworkConfinement
from firma.core.planner import RunArgs, build_plan
from firma.errors import GateError
from firma.core.hostfacts import Host
from firma.run.sequence import run

CHILD = r"""
import json, os, socket, struct, sys, urllib.request
out = {"env": dict(os.environ)}
proxy = os.environ["HTTP_PROXY"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
out["allowed"] = opener.open(sys.argv[2], timeout=5).read().decode()
host, port = os.environ["FIRMA_DNS_STUB_ADDR"].rsplit(":", 1)
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(q, (host, int(port)))
r = s.recv(512)
out["dns_rcode"] = r[3] & 0x0F
out["dns_id"] = r[0] << 8 | r[1]
json.dump(out, open(sys.argv[1], "w"))
"""


class Child:
    limit_notes = ()

    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid

    async def wait(self):
        rc = await self.proc.wait()
        return rc if rc >= 0 else 128 - rc

    def forward_signal(self, signum):
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    def kill_tree(self):
        if self.proc.returncode is None:
            self.proc.kill()

    async def reap(self, timeout):
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self):
        pass


class FakeBackend:
    name = "runner"

    def __init__(self, proof: EnforcementProof, export=True):
        self.proof = proof
        self.export = export
        self.envelope = None

    def prepare(self, plan, host):
        return self.proof

    def routing(self):
        return RoutingPlan(mode=RoutingMode.HOST_LOOPBACK, dns_stub=True, export_dns_stub_env=self.export)

    async def launch(self, envelope, hooks):
        self.envelope = envelope
        proc = await asyncio.create_subprocess_exec(envelope.executable, *envelope.args, env=dict(envelope.env), cwd=envelope.cwd)
        return Child(proc)


STRUCTURAL = EnforcementProof("runner", True, True, NetworkConfinement.EXTERNAL_RUNNER, "external runner enforces the launch contract invariants")


def make_plan(tmp_path, argv, **kw):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    h = Host(system="linux", uid=os.getuid(), gid=os.getgid(), environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                                                        "FIRMA_STATE_DIR": str(tmp_path / "state")})
    args = RunArgs(command=tuple(argv), backend="runner", **kw)
    return build_plan(args, cfgmod.EMPTY, h, cwd=str(ws), unix_ms=1_700_000_000_000, rand=os.urandom(20)), h


def test_host_loopback_routing_serves_bridge_and_dns_stub(tmp_path):
    up = Upstream()
    try:
        out = tmp_path / "child.json"
        plan, h = make_plan(tmp_path, [sys.executable, "-c", CHILD, str(out), f"http://127.0.0.1:{up.port}/via-bridge"],
                            allow_hosts=(f"127.0.0.1:{up.port}",))
        be = FakeBackend(STRUCTURAL)
        rc = run(plan, h, backend=be, terminal=io.StringIO())
        assert rc == 0
        res = json.loads(out.read_text())
        env = be.envelope
        assert env.network.proxy_url.startswith("http://127.0.0.1:") and env.network.proxy_url != "http://127.0.0.1:18080"
        assert env.network.dns_stub_addr.startswith("127.0.0.1:")
        assert res["env"]["FIRMA_DNS_STUB_ADDR"] == env.network.dns_stub_addr
        assert res["env"]["HTTP_PROXY"] == env.network.proxy_url
        assert res["allowed"] == "hello from upstream\n"
        assert any(b"/via-bridge" in h for h in up.hits)
        assert res["dns_rcode"] == 5 and res["dns_id"] == 0x1234
        proof = json.loads(next((tmp_path / "state" / "proofs").glob("*.json")).read_text())
        assert proof["network_confinement"] == "external_runner" and proof["exit_status"] == 0
        # the services are gone after teardown
        host_port = int(env.network.proxy_url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", host_port), timeout=1)
    finally:
        up.close()


def test_dns_stub_env_only_when_backend_asks(tmp_path):
    plan, h = make_plan(tmp_path, ["true"])
    be = FakeBackend(STRUCTURAL, export=False)
    assert run(plan, h, backend=be, terminal=io.StringIO()) == 0
    assert "FIRMA_DNS_STUB_ADDR" not in be.envelope.env


def test_gate_fail_closed_disabled(tmp_path):
    plan, h = make_plan(tmp_path, ["sh", "-c", f"touch {tmp_path}/ran"])
    be = FakeBackend(EnforcementProof("runner", True, False, NetworkConfinement.EXTERNAL_RUNNER, "x"))
    with pytest.raises(GateError, match=r"^backend error \(runner\): fail-closed policy is disabled$"):
        run(plan, h, backend=be, terminal=io.StringIO())
    assert be.envelope is None and not (tmp_path / "ran").exists() and not (tmp_path / "state").exists()


def test_gate_non_structural_needs_opt_in(tmp_path):
    proof = EnforcementProof("vz", False, True, NetworkConfinement.PROXY_ONLY, "macOS backend active; outbound mediation is currently proxy-based")
    plan, h = make_plan(tmp_path, ["true"])
    with pytest.raises(GateError, match="--allow-non-structural.*FIRMA_RUN_ALLOW_NON_STRUCTURAL"):
        run(plan, h, backend=FakeBackend(proof), terminal=io.StringIO())
    plan, h = make_plan(tmp_path, ["true"], allow_non_structural=True)
    term = io.StringIO()
    assert run(plan, h, backend=FakeBackend(proof), terminal=term) == 0
    assert "backend compatibility proof — proxy-only mode; agent egress is NOT mandatorily confined;" in term.getvalue()
    assert "enforced=false" in term.getvalue()
    doc = json.loads(next((tmp_path / "state" / "proofs").glob("*.json")).read_text())
    assert doc["enforced"] is False and doc["structural"] is False

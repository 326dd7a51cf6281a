"""attack cases (docs/ATTACKS_COVERAGE.md) reached by `firma run` on Linux, run for real through the CLI.

One sandbox runs the probe (tests/linux/linux_probe.py) that tries every way out; the same probe
runs outside first as the positive control. Listeners on host loopback record what reached them:
after the control they must have hits, after the sandbox none."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from linux_support import (
    PROBE,
    SYSTEM_PYTHON,
    StreamRecorder,
    UdpRecorder,
    Upstream,
    base_env,
    require_tools,
    run_firma,
)

pytestmark = pytest.mark.confinement


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_tools()
    tmp = tmp_path_factory.mktemp("attacks")
    ws = tmp / "ws"
    ws.mkdir()
    tag = secrets.token_hex(4)
    xdg = Path(f"/var/lib/firma-test-xdg-{tag}")
    xdg.mkdir(mode=0o700)
    (xdg / "firma").mkdir(mode=0o700)
    (xdg / "firma" / "marker").write_text("state root content\n")
    tcp = StreamRecorder(socket.AF_INET, ("127.0.0.1", 0))
    tcp6 = StreamRecorder(socket.AF_INET6, ("::1", 0))
    udp = UdpRecorder()
    upstream = Upstream()
    unix_paths = [f"/run/firma-test-{tag}.sock", f"/tmp/firma-test-{tag}.sock", str(xdg / "bus")]
    unix = [StreamRecorder(socket.AF_UNIX, p) for p in unix_paths]
    for p in unix_paths:
        os.chmod(p, 0o777)
    abstract_name = f"firma-test-abstract-{tag}"
    abstract = StreamRecorder(socket.AF_UNIX, "\0" + abstract_name)
    # HOME and the dotfiles live outside /tmp (a fresh tmpfs inside): visible unless masked.
    home = Path(f"/var/lib/firma-test-home-{tag}")
    dot = Path(f"/var/lib/firma-test-dot-{tag}")
    (home / "visible.txt").parent.mkdir(parents=True)
    (home / "visible.txt").write_text("NOT-A-SECRET\n")
    (home / ".ssh").mkdir(parents=True)
    secret = home / ".ssh" / "id_ed25519"
    secret.write_text("PRIVATE-KEY-MATERIAL\n")
    # ~/.aws is a symlink to a directory elsewhere (dotfile managers do this): masked at its target
    (dot / "aws").mkdir(parents=True)
    (dot / "aws" / "credentials").write_text("AWS-SECRET-KEY\n")
    (home / ".aws").symlink_to(dot / "aws")
    cfg = {
        "tcp_port": tcp.addr[1],
        "tcp6_port": tcp6.addr[1],
        "udp_port": udp.port,
        "direct_url": f"http://127.0.0.1:{upstream.port}/direct",
        "unix_paths": unix_paths,
        "abstract_name": abstract_name,
        "dns_name": f"exfil-{tag}.attacker.invalid",
        "host_pid": os.getpid(),
        "secret_file": str(secret),
        "linked_secret": str(home / ".aws" / "credentials"),
        "visible_file": str(home / "visible.txt"),
        "leak_var": "FIRMA_TEST_HOST_SECRET",
        "results": str(ws / "outside.json"),
        "allowed_url": None,
        "state_dir": str(xdg / "firma"),
        "etc_write": f"/etc/firma-probe-{tag}",
    }
    recorders = {"tcp": tcp, "tcp6": tcp6, "udp": udp, "upstream": upstream, "abstract": abstract}
    recorders.update({p: r for p, r in zip(unix_paths, unix, strict=True)})
    env = base_env(tmp, XDG_RUNTIME_DIR=str(xdg), FIRMA_TEST_HOST_SECRET="leaked-value", HOME=str(home))
    env.pop("FIRMA_STATE_DIR")  # state root = $XDG_RUNTIME_DIR/firma, masked in the sandbox

    # The probe runs from the workspace: the checkout may live under /tmp, which the sandbox
    # replaces with a fresh tmpfs.
    probe = ws / "probe.py"
    shutil.copy(PROBE, probe)
    # Positive control: the same probe, outside, with no DNS (never a real query off the machine).
    (ws / "outside.cfg").write_text(json.dumps({**cfg, "dns_name": "localhost"}))
    subprocess.run([SYSTEM_PYTHON, str(probe), str(ws / "outside.cfg")], env=env, timeout=120, check=True, cwd=ws)
    outside = json.loads((ws / "outside.json").read_text())
    control_hits = {k: list(r.hits) for k, r in recorders.items()}
    if os.path.exists(cfg["etc_write"]):
        os.unlink(cfg["etc_write"])
    for r in recorders.values():
        r.reset()

    inside_cfg = {
        **cfg,
        "results": str(ws / "inside.json"),
        "allowed_url": f"http://127.0.0.1:{upstream.port}/allowed",
        "denied_url": f"http://denied-{tag}.example.com/secret?q=1",
    }
    (ws / "inside.cfg").write_text(json.dumps(inside_cfg))
    proc = run_firma(
        ["run", "--allow-host", f"127.0.0.1:{upstream.port}", "--proof-file", str(ws / "proof.json"),
         "--", SYSTEM_PYTHON, str(probe), str(ws / "inside.cfg")],
        cwd=ws, env=env, timeout=180,
    )
    inside = json.loads((ws / "inside.json").read_text()) if (ws / "inside.json").exists() else None
    result = {
        "proc": proc, "inside": inside, "outside": outside, "control_hits": control_hits,
        "hits": {k: list(r.hits) for k, r in recorders.items()}, "cfg": inside_cfg, "ws": ws,
        "xdg": xdg, "tag": tag, "upstream": upstream,
    }
    yield result
    for r in recorders.values():
        r.close()
    for p in unix_paths:
        if os.path.exists(p):
            os.unlink(p)
    shutil.rmtree(xdg, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(dot, ignore_errors=True)


def test_probe_ran_inside_the_sandbox(world):
    assert world["proc"].returncode == 0, world["proc"].stderr
    assert world["inside"] is not None, "probe left no evidence file"
    assert world["inside"]["inside"] is True
    assert world["outside"]["inside"] is False


def test_positive_controls_reached_every_listener(world):
    hits = world["control_hits"]
    assert world["outside"]["tcp_python"]["ok"]
    for key in ("tcp", "tcp6", "udp", "abstract", *world["cfg"]["unix_paths"]):
        assert hits[key], f"positive control did not reach {key}"
    assert any(b"PROBE-BASH" in h for h in hits["tcp"])
    assert any(b"PROBE-ENVI" in h for h in hits["tcp"])
    assert any(b"/direct" in h for h in hits["upstream"])
    assert world["outside"]["host_pid_visible"] is True
    assert world["outside"]["secret_read"]["ok"]
    assert world["outside"]["leak_var"] == "leaked-value"
    assert world["outside"]["unshare_net"]["rc"] == 0 and world["outside"]["ping"]["rc"] == 0
    assert world["outside"]["state_dir_visible"] is True


def test_raw_tcp_udp_bash_curl_envi_cannot_reach_host_loopback(world):
    inside = world["inside"]
    hits = world["hits"]
    assert not inside["tcp_python"]["ok"]
    assert not inside["tcp_ipv6"]["ok"]
    assert not inside["udp_python"]["ok"]
    assert inside["bash_dev_tcp"]["rc"] != 0
    assert inside["env_i_child"]["rc"] != 0
    # What reached the far side: nothing, on any of them.
    for key in ("tcp", "tcp6", "udp"):
        assert hits[key] == [], f"{key} listener was reached from the sandbox: {hits[key]}"
    # `curl --noproxy` to the allowed loopback port: transparent egress (DESIGN §5.4) plants that
    # port on every address inside, so the sandbox's own 127.0.0.1:PORT is the sidecar's. It may
    # arrive, but only decided and audited, never directly.
    assert _mediated(world, "/direct")


def _mediated(world, path: str) -> bool:
    """Every request for `path` that reached the upstream went through the sidecar: a request it
    allowed (the proxy, or plain HTTP to a name), or a tunnel it allowed to the upstream's address
    (an IP literal dialled directly is decided as one, as CONNECT to it is), each audited."""
    arrived = sum(1 for h in world["hits"]["upstream"] if h.startswith(f"GET {path}".encode()))
    with open(world["xdg"] / "firma" / "audit.jsonl") as f:
        events = [json.loads(line) for line in f]
    authority = f"127.0.0.1:{world['upstream'].port}"
    requests = [e for e in events if e["action"] == "http.request" and e["resource"].endswith(path) and e["decision"] == 1]
    tunnels = [e for e in events if e["action"] == "network.connect" and e["resource"] == authority and e["decision"] == 1]
    assert arrived and arrived <= len(requests) + len(tunnels), (arrived, len(requests), len(tunnels))
    return True


def test_host_unix_and_abstract_sockets_unreachable(world):
    inside = world["inside"]
    for path, res in inside["unix"].items():
        assert not res["ok"], f"{path} reachable: {res}"
        assert world["hits"][path] == []
    assert not inside["abstract"]["ok"]
    assert world["hits"]["abstract"] == []


def test_allowed_request_reaches_upstream_denied_gets_403(world):
    inside = world["inside"]
    assert inside["allowed"]["rc"] == 0, inside["allowed"]
    assert inside["allowed"]["out"].endswith("200")
    assert "hello from upstream" in inside["allowed"]["out"]
    assert any(h.startswith(b"GET /allowed") for h in world["hits"]["upstream"])
    denied = inside["denied"]["out"]
    assert denied.startswith("HTTP/1.1 403"), denied
    body = json.loads(denied.replace("\r\n", "\n").split("\n\n", 1)[1])
    assert body["denied"] is True and body["reason"]
    assert "x-firma-deny-reason" in denied.lower()


def test_unset_proxy_variables_do_not_open_a_way_out(world):
    # Without HTTP_PROXY curl dials 127.0.0.1:<upstream> itself: inside, that port is planted on
    # every address (transparent egress), so the request is decided and audited like the proxied
    # one; both arrive, and nothing arrives that the sidecar did not allow.
    assert world["inside"]["unset_proxy"]["out"] == "200"
    assert sum(1 for h in world["hits"]["upstream"] if b"/allowed" in h) == 2
    assert _mediated(world, "/allowed")


def test_dns_returns_no_address_and_the_stub_answered(world):
    inside = world["inside"]
    assert inside["getent"]["rc"] != 0 and inside["getent"]["out"] == ""
    assert not inside["py_dns"]["ok"]
    # dig got an answer from 127.0.0.1:53 — only the planted stub listens there — and it refused.
    for key in ("dig", "dig_tcp"):
        out = inside[key]["out"]
        assert "status: REFUSED" in out, out
        assert "SERVER: 127.0.0.1#53" in out, out


def test_host_pids_invisible(world):
    inside = world["inside"]
    assert inside["host_pid_visible"] is False
    assert max(inside["pids"]) < 100, inside["pids"]


def test_home_secrets_masked(world):
    assert "PRIVATE-KEY" in world["outside"]["secret_read"]["detail"]
    assert "AWS-SECRET" in world["outside"]["linked_secret_read"]["detail"]
    # HOME itself is visible inside: the masks, not /tmp, hide the secrets
    assert "NOT-A-SECRET" in world["inside"]["visible_read"]["detail"]
    for key in ("secret_read", "linked_secret_read"):
        res = world["inside"][key]
        assert not res["ok"] and "SECRET" not in res["detail"] and "PRIVATE" not in res["detail"], res


def test_host_environment_does_not_leak(world):
    assert world["inside"]["leak_var"] is None


def test_agent_has_no_capabilities_no_inherited_fds(world):
    st = world["inside"]["status"]
    assert st["CapEff"] == "0000000000000000"
    assert st["CapPrm"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1"
    assert st["Uid"].split()[0] != "0"
    assert st["Seccomp"] == "2"
    # 0,1,2 and the probe's own listdir fd: nothing of the launcher's leaks in (ATTACKS #33).
    assert len(world["inside"]["fds"]) == 4, world["inside"]["fds"]


def test_final_mount_table(world):
    mounts = {}
    for line in world["inside"]["mountinfo"].splitlines():
        parts = line.split()
        sep = parts.index("-")
        mounts[parts[4]] = (parts[sep + 1], parts[5])
    for p in ("/tmp", "/var/tmp", "/run", str(world["xdg"])):
        assert mounts.get(p, ("?",))[0] == "tmpfs", (p, mounts.get(p))
    assert mounts["/"][1].startswith("ro")
    assert mounts["/proc"][0] == "proc"
    assert mounts[str(world["ws"])][1].startswith("rw")
    assert mounts["/etc/resolv.conf"][1].startswith("ro")
    assert world["inside"]["ifaces"] == ["lo"]


def test_proof_document_records_measured_checks(world):
    proof_file = world["ws"] / "proof.json"
    doc = json.loads(proof_file.read_text())
    assert oct(proof_file.stat().st_mode & 0o777) == "0o600"
    state_copy = world["xdg"] / "firma" / "proofs" / f"{doc['sandbox_id']}.json"
    assert json.loads(state_copy.read_text()) == doc
    assert doc["version"] == 1 and doc["backend"] == "bwrap" and doc["enforced"] is True
    assert doc["network_confinement"] == "linux_network_namespace"
    assert doc["exit_status"] == 0 and doc["ended_at"]
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("netns_only_loopback", "resolv_conf_points_at_stub", "sidecar_ready",
                 "agent_no_capabilities", "agent_no_new_privs", "seccomp_artifact_sha256"):
        assert checks[name]["ok"], checks.get(name)
    assert checks["netns_only_loopback"]["detail"] == "interfaces: lo"
    assert "/root" in checks["masked_paths"]["detail"]
    assert [i["name"] for i in doc["invariants"]][0] == "sidecar_only_egress"
    # the per-run directory is gone
    assert not (world["xdg"] / "firma" / "run" / doc["sandbox_id"]).exists()


def test_no_writes_outside_the_workspace_and_resolv_conf_is_ours(world):
    inside = world["inside"]
    assert world["outside"]["write_etc"]["ok"]  # positive control (removed again by the fixture)
    assert not inside["write_etc"]["ok"] and not os.path.exists(world["cfg"]["etc_write"])
    assert not inside["write_resolv"]["ok"]


def test_no_new_namespaces_no_ping_no_state_dir(world):
    inside = world["inside"]
    assert inside["unshare_net"]["rc"] != 0
    assert inside["unshare_user_net"]["rc"] != 0
    assert inside["ping"]["rc"] != 0
    assert inside["state_dir_visible"] is False  # firma's state root (audit key, proofs) is masked


def _audit(world):
    doc = json.loads((world["ws"] / "proof.json").read_text())
    path = world["xdg"] / "firma" / "audit.jsonl"
    assert path.exists(), "the embedded sidecar wrote no audit log"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return doc["sandbox_id"], events


def test_stub_saw_the_dns_queries_and_forwarded_nothing(world):
    sid, events = _audit(world)
    name = world["cfg"]["dns_name"]
    dns = [e for e in events if e["action"] == "dns.query" and e["resource"].startswith(name)]
    assert dns, "the DNS stub reported no query for the probed name"
    assert all(e["sandbox_id"] == sid and e["decision"] == 2 for e in dns)


def test_decisions_are_attributed_to_this_sandbox(world):
    sid, events = _audit(world)
    port = world["upstream"].port
    allowed = [e for e in events if e["action"] == "http.request" and f"127.0.0.1:{port}/allowed" in e["resource"]]
    denied = [e for e in events if e["decision"] == 2 and f"denied-{world['tag']}.example.com" in e["resource"]]
    assert len(allowed) == 1 and allowed[0]["decision"] == 1 and allowed[0]["sandbox_id"] == sid
    assert len(denied) == 1 and denied[0]["sandbox_id"] == sid and denied[0]["deny_reason"]
    assert "q=1" not in denied[0]["resource"]  # query strings never reach the log


def test_spoofed_attribution_headers_are_replaced(world):
    """ATTACKS #20: the agent's own x-firma-* headers never reach the decision."""
    assert world["inside"]["spoofed"]["out"] == "200"
    sid, events = _audit(world)
    spoof = [e for e in events if e["resource"].endswith("/spoof")]
    assert len(spoof) == 1
    assert spoof[0]["sandbox_id"] == sid and spoof[0]["agent_id"] == "generic"

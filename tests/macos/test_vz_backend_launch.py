"""The whole macOS path on Linux: a `Host` describing macOS, a fake sandbox-exec that records
`-p <profile>` and runs the command, and a fake runner that records its argv and the contract."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from firma.backends.vz import DNS_STUB_ENV, VzBackend
from firma.core.model import INVARIANT_NAMES, VzInputs
from firma.errors import BackendError, UnsupportedBackendError
from vz_fixtures import (
    SECRET_VALUE,
    RecordingHooks,
    envelope,
    fake_sandbox_exec,
    guest_files,
    mac_host,
    recording_runner,
    run_plan,
)

MASKS = (".ssh", ".aws", ".azure", ".kube", ".gnupg", ".config/gcloud", ".docker", ".netrc")


def _prepared(tmp_path, vz, sandbox_exec=True, profile="generic"):
    sx, sx_out = fake_sandbox_exec(tmp_path)
    backend = VzBackend()
    proof = backend.prepare(run_plan(tmp_path, vz, profile), mac_host(str(sx) if sandbox_exec else None))
    return backend, proof, sx_out


def _run(backend, envl):
    rec = RecordingHooks()

    async def go():
        child = await backend.launch(envl, rec.hooks())
        return await child.wait()

    return asyncio.run(go()), rec


def _command(tmp_path: Path, code: int) -> str:
    """The confined command: records that it ran and its environment, exits `code`."""
    p = tmp_path / "agent.sh"
    p.write_text(f'#!/bin/sh\nenv > "{tmp_path}/agent-env"\necho "$@" > "{tmp_path}/agent-args"\n'
                 f"exit {code}\n")
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("vz", [VzInputs(), VzInputs(structural_network=True), VzInputs(guest=True)])
@pytest.mark.parametrize("system", ["linux", "windows", "freebsd"])
def test_non_macos_host_gets_the_spec_error(tmp_path, vz, system):
    with pytest.raises(UnsupportedBackendError) as exc:
        VzBackend().prepare(run_plan(tmp_path, vz), mac_host("/usr/bin/sandbox-exec", system=system))
    assert str(exc.value) == "unsupported backend vz on this host: VZ backend is only available on macOS hosts"


@pytest.mark.parametrize("vz", [VzInputs(), VzInputs(structural_network=True)])
def test_sandbox_exec_modes_need_sandbox_exec(tmp_path, vz):
    expected = "backend error (vz): sandbox-exec is not installed or not executable"
    for path in (None, str(tmp_path / "missing"), "relative/sandbox-exec"):
        with pytest.raises(BackendError) as exc:
            VzBackend().prepare(run_plan(tmp_path, vz), mac_host(path))
        assert str(exc.value) == expected
    noexec = tmp_path / "sx-noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    with pytest.raises(BackendError) as exc:
        VzBackend().prepare(run_plan(tmp_path, vz), mac_host(str(noexec)))
    assert str(exc.value) == expected


def test_guest_mode_does_not_need_sandbox_exec(tmp_path):
    files = guest_files(tmp_path)
    proof = VzBackend().prepare(run_plan(tmp_path, VzInputs(guest=True, **files)), mac_host(None))
    assert proof.detail == (
        "macOS Virtualization.framework guest mode selected; configured runner must boot the guest "
        "with bridge-only egress, deterministic DNS, and fail-closed sidecar reachability checks")


def test_proof_details_are_the_reference_texts(tmp_path):
    _, compat, _ = _prepared(tmp_path, VzInputs())
    assert compat.detail == "macOS backend active; outbound mediation is currently proxy-based"
    _, deny, _ = _prepared(tmp_path, VzInputs(structural_network=True))
    assert deny.detail == (
        "macOS sandbox-exec with deny network-outbound; wrapped process may only reach the Firma "
        "proxy bridge + DNS stub on loopback (port-scoped); all other loopback and external "
        "outbound denied by TrustedBSD MAC policy")


def test_network_deny_launch_through_sandbox_exec(tmp_path):
    backend, _, out = _prepared(tmp_path, VzInputs(structural_network=True), profile="claude-code")
    exe = _command(tmp_path, 42)
    envl = envelope(tmp_path, executable=exe, args=("x", "y z"), proxy_url="http://127.0.0.1:41000",
                    dns_stub_addr="127.0.0.1:41001", mask_home_paths=MASKS, home="/Users/ann",
                    env={"FIRMA_CAPABILITY_TOKEN": SECRET_VALUE})
    status, rec = _run(backend, envl)
    assert status == 42  # the command's exit status comes back through sandbox-exec
    profile = (out / "profile").read_text()
    lines = profile.splitlines()
    assert lines[:8] == [
        "(version 1)", "(allow default)",
        "; macOS structural: deny all outbound, allow only Firma loopback endpoints",
        "(deny network-outbound)",
        '(allow network-outbound (remote ip4 "localhost:41000"))',
        '(allow network-outbound (remote ip6 "localhost:41000"))',
        '(allow network-outbound (remote ip4 "localhost:41001"))',
        '(allow network-outbound (remote ip6 "localhost:41001"))',
    ]
    assert '(deny file-read* (subpath "/Users/ann/.ssh"))' in lines
    assert '(deny file-write* (subpath "/Users/ann/.config/gcloud"))' in lines
    assert len(lines) == 8 + 2 * len(MASKS)
    assert (out / "argv").read_text().splitlines() == [exe, "x", "y z"]
    agent_env = (tmp_path / "agent-env").read_text().splitlines()
    assert f"{DNS_STUB_ENV}=127.0.0.1:41001" in agent_env
    assert "HTTP_PROXY=http://127.0.0.1:41000" in agent_env
    names = {c.name for c in rec.checks}
    assert {"vz_mode", "sbpl_profile", "dns_stub_env"} <= names


def test_compatibility_launch_has_no_network_rules_and_no_stub(tmp_path):
    backend, _, out = _prepared(tmp_path, VzInputs())
    envl = envelope(tmp_path, executable=_command(tmp_path, 0), dns_stub_addr=None,
                    mask_home_paths=(".ssh",), home="/Users/ann")
    status, _ = _run(backend, envl)
    assert status == 0
    assert (out / "profile").read_text() == (
        '(version 1)\n(allow default)\n(deny file-read* (subpath "/Users/ann/.ssh"))\n'
        '(deny file-write* (subpath "/Users/ann/.ssh"))\n')
    assert not any(row.startswith(f"{DNS_STUB_ENV}=")
                   for row in (tmp_path / "agent-env").read_text().splitlines())


def test_network_deny_refuses_without_the_stub_or_the_bridge(tmp_path):
    for kw, what in (({"dns_stub_addr": None}, "dns_stub_addr"), ({"proxy_url": None}, "proxy_url")):
        backend, _, out = _prepared(tmp_path, VzInputs(structural_network=True))
        with pytest.raises(BackendError) as exc:
            _run(backend, envelope(tmp_path, executable=_command(tmp_path, 0), **kw))
        assert str(exc.value) == (f"backend error (vz): sandbox-exec launch requires {what} from "
                                  "network runtime; sidecar bridge was not prepared")
        assert not (out / "profile").exists()  # sandbox-exec never started
    assert not (tmp_path / "agent-env").exists()


def test_network_deny_refuses_a_non_loopback_bridge(tmp_path):
    backend, _, out = _prepared(tmp_path, VzInputs(structural_network=True))
    with pytest.raises(BackendError, match="not on host loopback"):
        _run(backend, envelope(tmp_path, proxy_url="http://example.invalid:8080"))
    assert not (out / "profile").exists()


def test_guest_launch_writes_the_contract_and_runs_the_runner(tmp_path):
    runner, out = recording_runner(tmp_path, exit_code=42)
    files = guest_files(tmp_path, runner=runner)
    backend, proof, sx_out = _prepared(tmp_path, VzInputs(guest=True, **files))
    envl = envelope(tmp_path, env={"FIRMA_CAPABILITY_TOKEN": SECRET_VALUE})
    status, rec = _run(backend, envl)
    assert status == 42
    argv = (out / "argv").read_text().splitlines()
    assert (out / "argc").read_text().strip() == "2"
    path = f"{envl.runtime_dir}/vz-guest/vz-guest-launch.json"
    assert argv == ["--launch-contract", path]
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"
    text = (out / "contract.json").read_text()
    c = json.loads(text)
    assert list(c) == ["version", "sandbox_id", "runtime_dir", "runner", "guest", "command",
                       "mounts", "network", "invariants"]
    assert c["runner"] == {"path": str(runner)}
    assert c["guest"] == {k: files[k] for k in ("kernel", "initrd", "rootfs")}
    assert [i["name"] for i in c["invariants"]] == list(INVARIANT_NAMES)
    assert c["command"]["env"][DNS_STUB_ENV] == "127.0.0.1:41001" == c["network"]["dns_stub_addr"]
    assert SECRET_VALUE not in text and "FIRMA_CAPABILITY_TOKEN" not in text
    assert not os.path.exists(path)  # removed at teardown
    assert not (sx_out / "profile").exists()  # guest mode never goes through sandbox-exec
    assert any(ch.name == "launch_contract_private" and ch.ok for ch in rec.checks)


@pytest.mark.parametrize("key", ["proxy_url", "dns_stub_addr"])
def test_guest_launch_without_network_runtime_starts_nothing(tmp_path, key):
    runner, out = recording_runner(tmp_path)
    files = guest_files(tmp_path, runner=runner)
    backend, _, _ = _prepared(tmp_path, VzInputs(guest=True, **files))
    envl = envelope(tmp_path, **{key: None})
    with pytest.raises(BackendError) as exc:
        _run(backend, envl)
    assert str(exc.value) == (f"backend error (vz): VZ guest launch requires {key} from "
                              "network runtime; sidecar bridge was not prepared")
    assert list(out.iterdir()) == []
    assert not os.path.exists(f"{envl.runtime_dir}/vz-guest/vz-guest-launch.json")


def test_guest_file_removed_after_prepare_refuses_before_the_runner(tmp_path):
    runner, out = recording_runner(tmp_path)
    files = guest_files(tmp_path, runner=runner)
    backend, _, _ = _prepared(tmp_path, VzInputs(guest=True, **files))
    os.unlink(files["rootfs"])
    with pytest.raises(BackendError, match="generated launch contract is invalid: /guest/rootfs"):
        _run(backend, envelope(tmp_path))
    assert list(out.iterdir()) == []


def test_launch_before_prepare_is_refused(tmp_path):
    with pytest.raises(BackendError, match="before prepare"):
        _run(VzBackend(), envelope(tmp_path))

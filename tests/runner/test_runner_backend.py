"""The runner backend: FIRMA_RUN_RUNNER validation (DESIGN §6 texts), proof and routing."""

from __future__ import annotations

import os

import pytest

from firma.backends.base import RoutingMode
from firma.backends.runner import DETAIL, RunnerBackend
from firma.core.model import Identity, NetworkConfinement, RunPlan
from firma.errors import BackendError
from firma.core.hostfacts import Host


def plan(runner_path):
    ident = Identity("sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f", "s", "generic", "generic", "u")
    return RunPlan(identity=ident, backend="runner", argv=("true",), cwd="/tmp", home="/root",
                   state_root="/tmp/firma-test", runner_path=runner_path)


LINUX = Host(system="linux")
MAC = Host(system="darwin")


def prepare(value, host=LINUX):
    return RunnerBackend().prepare(plan(value), host)


@pytest.fixture
def runner(tmp_path):
    p = tmp_path / "runner"
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o755)
    return p


@pytest.mark.parametrize("host", [LINUX, MAC, Host(system="freebsd")], ids=["linux", "macos", "other"])
def test_valid_runner_gives_external_runner_proof_on_any_host(runner, host):
    proof = prepare(str(runner), host)
    assert proof.backend == "runner"
    assert proof.structural is True and proof.fail_closed is True
    assert proof.network_confinement is NetworkConfinement.EXTERNAL_RUNNER
    assert proof.detail == "external runner enforces the launch contract invariants" == DETAIL


def test_routing_is_host_loopback_with_dns_stub(runner):
    b = RunnerBackend()
    b.prepare(plan(str(runner)), LINUX)
    r = b.routing()
    assert r.mode is RoutingMode.HOST_LOOPBACK and r.dns_stub is True


def _reason(value):
    with pytest.raises(BackendError) as ei:
        prepare(value)
    assert ei.value.backend == "runner"
    assert str(ei.value) == f"backend error (runner): {ei.value.reason}".strip()
    return ei.value.reason


def test_unset():
    assert _reason(None) == "runner backend requires FIRMA_RUN_RUNNER"


@pytest.mark.parametrize("value", ["", "runner", "./runner", "bin/runner"])
def test_not_absolute(value):
    assert _reason(value) == f"FIRMA_RUN_RUNNER must be an absolute path: {value}"


def test_missing(tmp_path):
    p = tmp_path / "nope"
    assert _reason(str(p)) == f"FIRMA_RUN_RUNNER does not exist: {p}"


def test_dangling_link(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    assert _reason(str(link)) == f"FIRMA_RUN_RUNNER does not exist: {link}"


def test_directory(tmp_path):
    assert _reason(str(tmp_path)) == f"FIRMA_RUN_RUNNER must point to a file: {tmp_path}"


def test_link_to_executable_is_fine(runner, tmp_path):
    link = tmp_path / "via-link"
    link.symlink_to(runner)
    assert prepare(str(link)).backend == "runner"


def test_not_executable(runner):
    runner.chmod(0o644)
    assert _reason(str(runner)) == f"FIRMA_RUN_RUNNER must be executable: {runner}"


def test_uninspectable(tmp_path):
    # A path through a file (ENOTDIR) does not exist; a too-long name cannot be inspected at all.
    long = "/" + "a" * 5000
    reason = _reason(long)
    assert reason.startswith(f"failed to inspect FIRMA_RUN_RUNNER {long}: ")


def test_backend_reads_no_environment(runner, monkeypatch):
    # The raw value comes from the plan; a FIRMA_RUN_RUNNER in os.environ is not consulted.
    monkeypatch.setenv("FIRMA_RUN_RUNNER", str(runner))
    assert _reason(None) == "runner backend requires FIRMA_RUN_RUNNER"
    assert os.environ["FIRMA_RUN_RUNNER"] == str(runner)


def test_launch_writes_contract_privately_and_runs_the_runner(tmp_path):
    """launch(): contract at <runtime_dir>/runner/launch.json (0600 in 0700), no guest section,
    runner started as `<runner> --launch-contract <abs path>`, its exit status kept, file removed."""
    import asyncio
    import json

    from firma.backends.base import LaunchHooks
    from firma.core.contract_validate import validate_contract
    from firma.core.model import ExecutionEnvelope, IdentityMode, NetworkEndpoints, frozen_map

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "runner.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{out}/argv"\n'
        f'stat -c %a "$2" > "{out}/mode"\n'
        f'cp "$2" "{out}/contract.json"\n'
        "exit 9\n"
    )
    script.chmod(0o755)
    sbx = "sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f"
    runtime = tmp_path / "state" / "run" / sbx
    runtime.mkdir(parents=True, mode=0o700)
    env = ExecutionEnvelope(
        sandbox_id=sbx, runtime_dir=str(runtime), executable="/bin/true", args=(), cwd=str(tmp_path),
        env=frozen_map({"PATH": "/usr/bin:/bin", "FIRMA_CAPABILITY_TOKEN": "secret"}),
        identity_mode=IdentityMode.SANDBOX_USER, home=str(tmp_path), seccomp_filter_path=None,
        mounts=(), mask_home_paths=(),
        network=NetworkEndpoints("http://127.0.0.1:41000", "127.0.0.1:41001", frozen_map({"x-firma-sandbox-id": sbx})),
    )
    checks = []
    backend = RunnerBackend()
    backend.prepare(plan(str(script)), LINUX)

    async def go():
        child = await backend.launch(env, LaunchHooks(serve_planted=None, add_check=checks.append))
        return await child.wait()

    assert asyncio.run(go()) == 9
    path = f"{runtime}/runner/launch.json"
    assert (out / "argv").read_text().splitlines() == ["--launch-contract", path]
    assert (out / "mode").read_text().strip() == "600"
    contract = json.loads((out / "contract.json").read_text())
    assert "guest" not in contract and validate_contract(contract) == []
    assert "FIRMA_CAPABILITY_TOKEN" not in contract["command"]["env"]
    assert not os.path.exists(path)  # removed once the runner exited
    assert any(c.name == "launch_contract_private" and c.ok for c in checks)


def test_launch_refuses_without_network_runtime(tmp_path, runner):
    import asyncio

    from firma.backends.base import LaunchHooks
    from firma.core.model import ExecutionEnvelope, IdentityMode, NetworkEndpoints
    from firma.errors import FirmaError

    env = ExecutionEnvelope(
        sandbox_id="sbx_1", runtime_dir=str(tmp_path), executable="/bin/true", args=(), cwd=str(tmp_path),
        env={}, identity_mode=IdentityMode.SANDBOX_USER, home=str(tmp_path), seccomp_filter_path=None,
        mounts=(), mask_home_paths=(), network=NetworkEndpoints(None, "127.0.0.1:1"),
    )
    backend = RunnerBackend()
    backend.prepare(plan(str(runner)), LINUX)
    with pytest.raises(FirmaError, match=r"^backend error \(runner\): runner launch requires proxy_url from network runtime; sidecar bridge was not prepared$"):
        asyncio.run(backend.launch(env, LaunchHooks(serve_planted=None, add_check=lambda c: None)))
    assert not os.path.exists(f"{tmp_path}/runner/launch.json")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_runner_dies_with_a_killed_launcher_and_gets_no_agent_environment(tmp_path):
    """SIGKILL of firma leaves no runner behind (its egress would go to whatever bound the freed
    bridge port); and the runner's environment is firma's, not the agent's — PYTHONPATH and
    LD_PRELOAD set for the agent never reach it. Control: without the kill the runner keeps
    running (its sleep is long), so its disappearance is the parent-death signal."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "runner.sh"
    script.write_text(f"#!/bin/sh\necho $$ > {out}/pid\nenv > {out}/env\nexec sleep 300\n")
    script.chmod(0o755)
    ws = tmp_path / "ws"
    ws.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "agent-env.toml"
    cfg.write_text('[run]\nenv_set = { PYTHONPATH = "/ws/evil", LD_PRELOAD = "/ws/evil.so" }\n')
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "FIRMA_STATE_DIR": str(tmp_path / "state"),
           "FIRMA_RUN_RUNNER": str(script), "LANG": "C.UTF-8"}
    proc = subprocess.Popen([sys.executable, "-m", "firma", "--config", str(cfg), "run", "--backend", "runner",
                             "--", "true"], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (out / "pid").exists() or not (out / "pid").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        runner = int((out / "pid").read_text())
        time.sleep(0.3)
        assert _alive(runner)  # control: running while firma runs
        names = {line.split("=", 1)[0] for line in (out / "env").read_text().splitlines() if "=" in line}
        assert not names & {"PYTHONPATH", "LD_PRELOAD", "FIRMA_RUN_SANDBOX_ID", "HTTP_PROXY"}, names
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(runner) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(runner)
    finally:
        if proc.poll() is None:
            proc.kill()
        if (out / "pid").exists() and _alive(int((out / "pid").read_text() or 0)):
            os.kill(int((out / "pid").read_text()), signal.SIGKILL)


def test_runner_proof_says_limits_are_not_enforced_by_firma(runner):
    """Launch contract v1 carries no limits: the proof says so, an explicit one is refused unless
    --limits best-effort."""
    from firma.core import limits, proofdoc
    from firma.core.model import DEFAULT_INVARIANTS
    from firma.core.record import replace
    from firma.errors import LaunchError

    proof = prepare(str(runner))
    doc = proofdoc.build(identity=plan("x").identity, proof=proof, invariants=DEFAULT_INVARIANTS, checks=(),
                         sidecar_endpoint=None, sidecar_embedded=True, started_at="t", ended_at=None, exit_status=None)
    assert doc["limits"]["enforced_by_firma"] is False
    assert {e["name"] for e in doc["limits"]["entries"]} == {"memory", "pids", "cpus", "nofile", "file_size"}
    assert not any(e["enforced"] for e in doc["limits"]["entries"])
    asked = replace(plan(str(runner)), limits=limits.request({}, {"pids": 100}, None))
    with pytest.raises(LaunchError, match="--pids cannot be enforced by the runner backend"):
        RunnerBackend().prepare(asked, LINUX)
    lenient = replace(asked, limits=limits.request({}, {"pids": 100, "mode": "best-effort"}, None))
    assert RunnerBackend().prepare(lenient, LINUX).limits.mode == "best-effort"

"""Contracts firma really produces — `firma run --backend runner` and the VZ guest path — pass the
runner-side validator and the published JSON Schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema

from firma.core.contract_validate import contract_schema, validate_contract

SCHEMA = jsonschema.Draft202012Validator(contract_schema())


def capture_runner(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    out = tmp_path / "captured"
    out.mkdir()
    script = tmp_path / "capture_runner.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'OUT="{out}"\n'
        'printf "%s\\n" "$@" > "$OUT/argv"\n'
        'stat -c %a "$2" > "$OUT/mode"\n'
        'stat -c %a "$(dirname "$2")" > "$OUT/dirmode"\n'
        'cp "$2" "$OUT/contract.json"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script, out


def run_firma(tmp_path: Path, runner: Path, *extra_env: tuple[str, str]):
    work = tmp_path / "workspace"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRMA_")}
    env.update({"FIRMA_STATE_DIR": str(tmp_path / "state"), "FIRMA_RUN_RUNNER": str(runner),
                "FIRMA_CAPABILITY_TOKEN": "must-never-appear"})
    env.update(dict(extra_env))
    return subprocess.run(
        [sys.executable, "-m", "firma", "run", "--backend", "runner", "--", "/bin/echo", "hi"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )


def test_firma_run_backend_runner_contract_validates_and_matches_schema(tmp_path):
    runner, out = capture_runner(tmp_path, exit_code=5)
    r = run_firma(tmp_path, runner)
    assert r.returncode == 5, r.stderr  # the runner's exit status is the run's
    argv = (out / "argv").read_text().splitlines()
    assert argv[0] == "--launch-contract" and len(argv) == 2
    path = argv[1]
    assert os.path.isabs(path) and path.endswith("/runner/launch.json")
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"
    contract = json.loads((out / "contract.json").read_text())
    assert validate_contract(contract) == []
    SCHEMA.validate(contract)
    assert "guest" not in contract
    assert path == f"{contract['runtime_dir']}/runner/launch.json"
    assert contract["runner"]["path"] == str(runner)
    assert contract["command"]["executable"].endswith("echo") and contract["command"]["args"] == ["hi"]
    assert "FIRMA_CAPABILITY_TOKEN" not in contract["command"]["env"]
    assert "must-never-appear" not in (out / "contract.json").read_text()
    assert contract["network"]["proxy_url"].startswith("http://127.0.0.1:")
    assert contract["network"]["dns_stub_addr"].startswith("127.0.0.1:")
    assert contract["network"]["attribution_headers"]["x-firma-sandbox-id"] == contract["sandbox_id"]
    assert [i["mode"] for i in contract["invariants"]] == ["required"] * 6
    # The CLI validator agrees on the file as written (mode 0600 kept by a private copy).
    copy = tmp_path / "copy.json"
    copy.write_text((out / "contract.json").read_text())
    copy.chmod(0o600)
    v = subprocess.run([sys.executable, "-m", "firma", "contract", "validate", str(copy)],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr


def test_vz_guest_contract_validates_and_matches_schema(tmp_path):
    from firma.core.contract import build_contract, contract_json
    from firma.core.model import (
        ExecutionEnvelope, IdentityMode, Mount, NetworkEndpoints, frozen_map,
    )

    guest = {}
    for name in ("kernel", "initrd", "rootfs"):
        p = tmp_path / name
        p.write_bytes(b"x")
        guest[name] = str(p)
    sbx = "sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f"
    env = ExecutionEnvelope(
        sandbox_id=sbx, runtime_dir=f"/tmp/firma-0/run/{sbx}", executable="/usr/bin/true", args=("a",),
        cwd=str(tmp_path), env=frozen_map({"HOME": "/h", "HTTP_PROXY": "http://127.0.0.1:41000"}),
        identity_mode=IdentityMode.HOST_USER, home="/h", seccomp_filter_path=None,
        mounts=(Mount(str(tmp_path), str(tmp_path), False),), mask_home_paths=(),
        network=NetworkEndpoints("http://127.0.0.1:41000", "127.0.0.1:41001",
                                 frozen_map({"x-firma-sandbox-id": sbx, "x-firma-user": "u"})),
    )
    contract = json.loads(contract_json(build_contract(env, "/usr/local/bin/vz-runner", guest=guest)))
    assert list(contract)[:5] == ["version", "sandbox_id", "runtime_dir", "runner", "guest"]
    assert validate_contract(contract, file_exists=os.path.isfile) == []
    SCHEMA.validate(contract)
    assert contract["command"]["identity_mode"] == "host_user"
    # Dropping a guest file makes it invalid for the runner.
    os.unlink(guest["rootfs"])
    assert validate_contract(contract, file_exists=os.path.isfile)



def test_vz_backend_guest_launch_contract_validates_and_matches_schema(tmp_path):
    """The real VZ guest path (VzBackend.prepare + launch on a described macOS host) with a runner
    that captures the contract it is handed."""
    import asyncio

    from firma.backends.base import LaunchHooks
    from firma.backends.vz import VzBackend
    from firma.core.model import (
        ExecutionEnvelope, Identity, IdentityMode, NetworkEndpoints, RunPlan, VzInputs, frozen_map,
    )
    from firma.core.hostfacts import Host

    runner, out = capture_runner(tmp_path, exit_code=0)
    files = {}
    for name in ("kernel", "initrd", "rootfs"):
        p = tmp_path / name
        p.write_bytes(b"x")
        files[name] = str(p)
    sbx = "sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f"
    runtime = tmp_path / "state" / "run" / sbx
    runtime.mkdir(parents=True, mode=0o700)
    plan = RunPlan(
        identity=Identity(sbx, "s", "generic", "generic", "u"), backend="vz", argv=("/usr/bin/true",),
        cwd=str(tmp_path), home=str(tmp_path), state_root=str(tmp_path / "state"),
        vz=VzInputs(guest=True, runner=str(runner), **files),
    )
    backend = VzBackend()
    backend.prepare(plan, Host(system="darwin"))
    env = ExecutionEnvelope(
        sandbox_id=sbx, runtime_dir=str(runtime), executable="/usr/bin/true", args=(), cwd=str(tmp_path),
        env=frozen_map({"PATH": "/usr/bin:/bin", "HTTP_PROXY": "http://127.0.0.1:41000"}),
        identity_mode=IdentityMode.SANDBOX_USER, home=str(tmp_path), seccomp_filter_path=None,
        mounts=(), mask_home_paths=(),
        network=NetworkEndpoints("http://127.0.0.1:41000", "127.0.0.1:41001", frozen_map({"x-firma-sandbox-id": sbx})),
    )

    async def go():
        child = await backend.launch(env, LaunchHooks(serve_planted=None, add_check=lambda c: None))
        return await child.wait()

    assert asyncio.run(go()) == 0
    argv = (out / "argv").read_text().splitlines()
    assert argv == ["--launch-contract", f"{runtime}/vz-guest/vz-guest-launch.json"]
    assert (out / "mode").read_text().strip() == "600"
    contract = json.loads((out / "contract.json").read_text())
    assert contract["guest"] == files
    assert validate_contract(contract, file_exists=os.path.isfile) == []
    SCHEMA.validate(contract)


def test_firma_run_with_the_reference_runner_end_to_end(tmp_path):
    """firma run --backend runner with FIRMA_RUN_RUNNER=firma-runner-linux: the whole chain (real
    sidecar, bridge and DNS stub on host loopback, the contract, bubblewrap). The agent reaches an
    allowed loopback upstream only through the proxy; a direct connection to a listener on host
    loopback does not arrive (positive control: the same connection from the host does)."""
    import shutil
    import socket

    from firma.runner.conformance.listeners import TrapTcp, Upstream

    if shutil.which("bwrap") is None:
        raise AssertionError("bwrap is required; run scripts/install-system-deps.sh")
    runner = str(Path(sys.executable).parent / "firma-runner-linux")

    upstream = Upstream("runner-e2e")
    trap = TrapTcp()
    up_port, trap_port = upstream.port, trap.port

    # Positive control from the host: the trap listener records a connection.
    with socket.create_connection(("127.0.0.1", trap_port), timeout=5) as s:
        s.sendall(b"control")
    agent = (
        "import os, socket, urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{up_port}/via-proxy', timeout=10).read().decode().strip())\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {trap_port}), timeout=3).sendall(b'direct')\n"
        "    print('direct: connected')\n"
        "except OSError as e:\n"
        "    print('direct: blocked', type(e).__name__)\n"
        "print('proxy', os.environ['HTTP_PROXY'])\n"
    )
    work = tmp_path / "workspace"
    work.mkdir()
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRMA_")}
    env.update({"FIRMA_STATE_DIR": str(state), "FIRMA_RUN_RUNNER": runner, "PATH": "/usr/bin:/bin"})
    proof_file = tmp_path / "proof.json"
    r = subprocess.run(
        [sys.executable, "-m", "firma", "run", "--backend", "runner", "--allow-host", f"127.0.0.1:{up_port}",
         "--proof-file", str(proof_file), "--", "/usr/bin/python3", "-c", agent],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    trapped = trap.barrier()  # everything that reached the trap, the host's control included
    arrived = upstream.rec.snapshot()
    upstream.close()
    trap.close()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == upstream.body.decode().strip()
    assert lines[1].startswith("direct: blocked")
    assert lines[2] == "proxy http://127.0.0.1:18080"
    assert any(b"/via-proxy" in a.data for a in arrived)
    assert [a.data for a in trapped] == [b"control"]
    proof = json.loads(proof_file.read_text())
    assert proof["backend"] == "runner" and proof["network_confinement"] == "external_runner"
    assert proof["detail"] == "external runner enforces the launch contract invariants"
    assert proof["structural"] is True and proof["exit_status"] == 0

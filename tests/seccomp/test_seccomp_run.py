"""The managed filter through `firma run` (bwrap backend): blocks, refusals, proof."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from seccomp_support import HARDENING_TESTS, read_evidence, write_policy

from firma.core.seccomp_policy import DEFAULT_POLICY_VERSION

pytestmark = pytest.mark.confinement
EPERM = str(errno.EPERM)
# The real CLI; it uses the Linux tests' minimal service stand-in until firma.services lands
# (services play no part in what these tests check).
DRIVE = Path(__file__).resolve().parents[1] / "linux" / "linux_drive.py"


@pytest.fixture
def ws(tmp_path, probe_dir):
    """A workspace (the run's cwd, read-write inside) holding the probe, a home and a state dir."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(probe_dir / "probe", ws / "probe")
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return ws


def firma_run(ws: Path, cmd, config: Path | None = None, proof: Path | None = None):
    env = {"HOME": str(ws.parent / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "FIRMA_STATE_DIR": str(ws.parent / "state"), "LANG": "C.UTF-8"}
    argv = [sys.executable, str(DRIVE)]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["run", "--backend", "bwrap"]
    if proof is not None:
        argv += ["--proof-file", str(proof)]
    return subprocess.run([*argv, "--", *cmd], cwd=str(ws), env=env, capture_output=True,
                          text=True, timeout=90)


def artifact_dir(ws: Path) -> Path:
    base = ws.parent / "state" / "seccomp-artifacts" / "firma-default" / DEFAULT_POLICY_VERSION
    (arch,) = os.listdir(base)
    return base / arch


def test_run_blocks_every_hardening_entry_and_records_sha(ws, run_probe):
    outside = run_probe(HARDENING_TESTS, sandbox=False)
    assert outside.results == {t: "0" for t in HARDENING_TESTS}  # positive control
    proof = ws.parent / "proof.json"
    foreign = ["int80", "x32"] if os.uname().machine == "x86_64" else []
    out = firma_run(ws, ["./probe", str(ws / "ev"), *HARDENING_TESTS, "unshare_cli", *foreign],
                    proof=proof)
    assert out.returncode == 0, out.stderr
    results, started, done = read_evidence(ws / "ev")
    assert started and done
    assert {t: results[t] for t in HARDENING_TESTS} == {t: EPERM for t in HARDENING_TESTS}
    assert results["unshare_cli"] not in ("0", "127")
    for t in foreign:  # other ABIs: the process is killed, not answered
        assert results[t] == f"signal:{int(signal.SIGSYS)}"
    sha = json.loads((artifact_dir(ws) / "policy.metadata.json").read_text())["bpf_sha256"]
    assert sha in proof.read_text()


def _refused(ws, out):
    assert out.returncode == 1
    assert out.stderr.startswith("[ERR]  ") and out.stderr.count("\n") == 1, out.stderr
    assert "seccomp" in out.stderr
    assert not (ws / "ev").exists()  # the command never ran


def test_run_refuses_tampered_bpf(ws):
    assert firma_run(ws, ["true"]).returncode == 0
    bpf = artifact_dir(ws) / "policy.bpf"
    data = bytearray(bpf.read_bytes())
    data[-1] ^= 0xFF
    bpf.write_bytes(bytes(data))
    _refused(ws, firma_run(ws, ["./probe", str(ws / "ev"), "ptrace"]))


def test_run_refuses_tampered_metadata(ws):
    assert firma_run(ws, ["true"]).returncode == 0
    meta = artifact_dir(ws) / "policy.metadata.json"
    meta.write_text(meta.read_text().replace('"ptrace",\n', ""))
    _refused(ws, firma_run(ws, ["./probe", str(ws / "ev"), "ptrace"]))


def test_run_refuses_group_writable_artifact(ws):
    assert firma_run(ws, ["true"]).returncode == 0
    os.chmod(artifact_dir(ws) / "policy.bpf", 0o660)
    _refused(ws, firma_run(ws, ["./probe", str(ws / "ev"), "ptrace"]))


def test_run_refuses_symlinked_artifact(ws, tmp_path):
    assert firma_run(ws, ["true"]).returncode == 0
    bpf = artifact_dir(ws) / "policy.bpf"
    real = tmp_path / "real.bpf"
    real.write_bytes(bpf.read_bytes())
    real.chmod(0o600)
    bpf.unlink()
    bpf.symlink_to(real)
    _refused(ws, firma_run(ws, ["./probe", str(ws / "ev"), "ptrace"]))


def test_run_project_policy_denies_execute_after_start(ws):
    pol = write_policy(ws.parent / "seccomp.toml", ["system.execute", "credential.write"])
    cfg = ws.parent / "firma.toml"
    cfg.write_text(f'[run]\nseccomp_policy = {{ source_policy_path = "{pol}", '
                   f'artifact_dir = "{ws.parent / "artifacts"}" }}\n')
    tests = ["execve", "execveat", "setuid"]
    # Positive control: without the policy the same run can exec and change credentials.
    out = firma_run(ws, ["./probe", str(ws / "ev0"), *tests])
    assert read_evidence(ws / "ev0")[0] == {t: "0" for t in tests}, out.stderr
    out = firma_run(ws, ["./probe", str(ws / "ev"), *tests], config=cfg)
    results, started, done = read_evidence(ws / "ev")
    assert started and done, out.stderr  # the initial command started
    assert results == {"execve": EPERM, "execveat": EPERM, "setuid": EPERM}
    assert (ws.parent / "artifacts" / "proj" / "1").is_dir()

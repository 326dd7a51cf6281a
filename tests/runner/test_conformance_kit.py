"""`firma conformance` end to end, for real: the reference runner (bubblewrap) must pass all six
invariants; the naive fixture runner (just executes the command) must fail the three network
invariants; a runner that never runs the command passes nothing. Every probe leaves an evidence
file with the kit's nonce, and every silent result is backed by a live positive control."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.confinement

HERE = Path(__file__).parent
NAIVE = HERE / "fixtures" / "naive_runner.py"
NETWORK_INVARIANTS = {"sidecar_only_egress", "dns_confined", "direct_bypass_resistant"}
ALL = [
    "sidecar_only_egress",
    "dns_confined",
    "fail_closed_startup",
    "fail_closed_runtime",
    "direct_bypass_resistant",
    "preserve_stdio_signals_exit",
]


def reference_runner() -> str:
    path = Path(sys.executable).parent / "firma-runner-linux"
    if not path.exists():
        pytest.fail(f"firma-runner-linux console script missing next to {sys.executable}; run: pip install -e .")
    if shutil.which("bwrap") is None:
        pytest.fail("bwrap is required for the reference runner; run scripts/install-system-deps.sh")
    return str(path)


def conformance(runner: str, evidence_dir: Path):
    r = subprocess.run(
        [sys.executable, "-m", "firma", "conformance", "--runner", runner, "--json",
         "--evidence-dir", str(evidence_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.stdout, f"no report (exit {r.returncode}): {r.stderr[-2000:]}"
    report = json.loads(r.stdout)
    return r.returncode, report, {x["invariant"]: x for x in report["results"]}


def assert_evidence_files(result):
    assert result["files"], result
    for f in result["files"]:
        doc = json.loads(Path(f).read_text())
        assert doc["nonce"] and doc["probe"] and "result" in doc


def controls_ok(result) -> bool:
    return all(c["ok"] for c in result["checks"] if c["name"].startswith("control"))


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory):
    return conformance(reference_runner(), tmp_path_factory.mktemp("ref-evidence"))


@pytest.fixture(scope="module")
def naive_report(tmp_path_factory):
    assert os.stat(NAIVE).st_mode & stat.S_IXUSR, "fixture runner must be executable"
    return conformance(str(NAIVE), tmp_path_factory.mktemp("naive-evidence"))


def test_reference_runner_passes_every_invariant(reference_report):
    code, report, by_name = reference_report
    failing = {k: v["evidence"] for k, v in by_name.items() if v["result"] != "pass"}
    assert not failing, failing
    assert list(by_name) == ALL
    assert code == 0 and report["passed"] is True
    for result in by_name.values():
        assert controls_ok(result), result
        assert_evidence_files(result)


def test_reference_runner_fails_closed_when_bridge_is_killed_mid_run(reference_report):
    _, _, by_name = reference_report
    checks = {c["name"]: c["ok"] for c in by_name["fail_closed_runtime"]["checks"]}
    assert checks["runner: probe reached the kill point (READY handshake)"]
    assert checks["runner: request via proxy_url worked before the bridge was killed"]
    assert checks["runner: request via proxy_url failed after the bridge was killed"]
    assert checks["runner: no direct fallback (direct request and trap connect failed)"]
    assert checks["runner: no request reached the upstream after the kill"]
    assert checks["control: direct request after the kill reached the upstream"]


def test_reference_runner_dns_goes_only_to_the_stub(reference_report):
    _, _, by_name = reference_report
    checks = {c["name"]: c["ok"] for c in by_name["dns_confined"]["checks"]}
    assert checks["runner: the host DNS stub saw the query"]
    assert checks["runner: nothing reached the loopback resolver stand-in"]


def test_naive_runner_fails_the_network_invariants(naive_report):
    code, report, by_name = naive_report
    assert code == 1 and report["passed"] is False
    for name in NETWORK_INVARIANTS:
        result = by_name[name]
        assert result["result"] == "fail", result
        # It fails on what reached the far side, with live controls, not on a broken probe.
        assert controls_ok(result), result
        assert any(not c["ok"] and c["name"].startswith("runner:") for c in result["checks"])
        assert_evidence_files(result)
    # What the naive runner does do, it does: stdio, signals and exit status pass through exec.
    assert by_name["preserve_stdio_signals_exit"]["result"] == "pass"


def test_naive_runner_evidence_shows_direct_egress(naive_report):
    _, _, by_name = naive_report
    failed = {c["name"] for c in by_name["sidecar_only_egress"]["checks"] if not c["ok"]}
    assert "runner: nothing reached the trap listener" in failed
    failed = {c["name"] for c in by_name["dns_confined"]["checks"] if not c["ok"]}
    assert "runner: nothing reached the loopback resolver stand-in" in failed


def test_runner_that_never_runs_the_command_passes_nothing(tmp_path):
    lazy = tmp_path / "lazy_runner"
    lazy.write_text("#!/bin/sh\nexit 0\n")
    lazy.chmod(0o755)
    code, report, by_name = conformance(str(lazy), tmp_path / "evidence")
    assert code == 1
    assert {k for k, v in by_name.items() if v["result"] == "pass"} == set()


def test_table_output_and_exit_status(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "firma", "conformance", "--runner", str(NAIVE), "--evidence-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["invariant", "result", "evidence"]
    rows = {ln.split()[0]: ln.split()[1] for ln in lines[1:7]}
    assert rows["sidecar_only_egress"] == "FAIL" and rows["preserve_stdio_signals_exit"] == "PASS"
    assert lines[-1] == f"evidence: {tmp_path}/evidence"


def test_missing_runner_is_one_error_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "firma", "conformance", "--runner", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("[ERR]  runner ") and len(r.stderr.strip().splitlines()) == 1


def _lazy(tmp_path: Path) -> str:
    lazy = tmp_path / "lazy_runner"
    lazy.write_text("#!/bin/sh\nexit 0\n")
    lazy.chmod(0o755)
    return str(lazy)


def test_an_evidence_dir_of_another_user_is_refused_and_its_probes_never_run(tmp_path):
    """Another user's directory given as --evidence-dir: refused in one line, and the probes.py
    planted there never runs. Control: a fresh directory is created privately and used."""
    import pwd

    if os.geteuid() != 0:
        pytest.fail("the test chowns a directory to another user; CI runs as root")
    other = pwd.getpwnam("firma-test").pw_uid
    ev = tmp_path / "theirs"
    (ev / "probe").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (ev / "probe" / "probes.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for p in (ev, ev / "probe", ev / "probe" / "probes.py"):
        os.chown(p, other, other)
    r = subprocess.run([sys.executable, "-m", "firma", "conformance", "--runner", _lazy(tmp_path),
                        "--evidence-dir", str(ev)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("[ERR]  ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"owned by uid {other}" in r.stderr
    assert not marker.exists()
    fresh = tmp_path / "mine"
    r = subprocess.run([sys.executable, "-m", "firma", "conformance", "--runner", _lazy(tmp_path),
                        "--evidence-dir", str(fresh)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "[ERR]" not in r.stderr, r.stderr  # ran (and the lazy runner failed)
    assert fresh.stat().st_mode & 0o777 == 0o700 and (fresh / "probe" / "probes.py").is_file()


def test_a_symlinked_probes_py_is_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    victim.chmod(0o600)
    ev = tmp_path / "ev"
    (ev / "probe").mkdir(parents=True, mode=0o700)
    ev.chmod(0o700)
    (ev / "probe").chmod(0o700)
    os.symlink(victim, ev / "probe" / "probes.py")
    r = subprocess.run([sys.executable, "-m", "firma", "conformance", "--runner", _lazy(tmp_path),
                        "--evidence-dir", str(ev)], capture_output=True, text=True, timeout=120)
    assert "[ERR]" not in r.stderr, r.stderr
    assert victim.read_text() == "keep\n" and victim.stat().st_mode & 0o777 == 0o600
    assert not (ev / "probe" / "probes.py").is_symlink()

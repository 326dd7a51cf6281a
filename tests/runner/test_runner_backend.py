"""The runner backend: FIRMA_RUN_RUNNER validation (SPEC §6 texts), proof and routing."""

from __future__ import annotations

import os

import pytest

from firma.backends.base import RoutingMode
from firma.backends.runner import DETAIL, RunnerBackend
from firma.core.model import Identity, NetworkConfinement, RunPlan
from firma.errors import BackendError
from firma.host import Host


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

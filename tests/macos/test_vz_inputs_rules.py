"""Mode selection (the four-row truth table) and guest input validation (DESIGN §6): every row for
every variable, exact texts, first failure wins, inspected once, nothing started on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from firma.backends.vz import VzBackend
from firma.core.model import NetworkConfinement, VzInputs
from firma.core.vzinputs import (
    GUEST_ENV_NAMES,
    PathFacts,
    VzMode,
    inspect_path,
    select_mode,
    validate_guest_inputs,
    vz_inputs_from_environ,
)
from firma.errors import BackendError
from vz_fixtures import fake_sandbox_exec, guest_files, mac_host, recording_runner, run_plan

FIELD = {"FIRMA_RUN_VZ_GUEST_RUNNER": "runner", "FIRMA_RUN_VZ_GUEST_KERNEL": "kernel",
         "FIRMA_RUN_VZ_GUEST_INITRD": "initrd", "FIRMA_RUN_VZ_GUEST_ROOTFS": "rootfs"}


@pytest.mark.parametrize("guest, structural, mode, structural_proof, confinement", [
    (False, False, VzMode.COMPATIBILITY, False, NetworkConfinement.PROXY_ONLY),
    (False, True, VzMode.NETWORK_DENY, True, NetworkConfinement.MACOS_SANDBOX_NETWORK_DENY),
    (True, False, VzMode.GUEST, True, NetworkConfinement.MACOS_VZ_GUEST),
    (True, True, VzMode.GUEST, True, NetworkConfinement.MACOS_VZ_GUEST),  # guest wins
])
def test_mode_truth_table(tmp_path, guest, structural, mode, structural_proof, confinement):
    files = guest_files(tmp_path)
    inputs = VzInputs(guest=guest, structural_network=structural, **files)
    assert select_mode(inputs) is mode
    sx, _ = fake_sandbox_exec(tmp_path)
    backend = VzBackend()
    proof = backend.prepare(run_plan(tmp_path, inputs), mac_host(str(sx)))
    assert backend.mode is mode
    assert (proof.backend, proof.structural, proof.fail_closed, proof.network_confinement) == (
        "vz", structural_proof, True, confinement)
    routing = backend.routing()
    assert routing.mode.value == "host_loopback"
    # Both structural modes need the host DNS refusal stub and export its address.
    assert routing.dns_stub is structural_proof and routing.export_dns_stub_env is structural_proof


@pytest.mark.parametrize("raw, expected", [
    (None, False), ("", False), ("0", False), ("no", False), ("off", False), ("2", False),
    ("1", True), ("true", True), (" YES ", True), ("On", True), ("TRUE\n", True),
])
def test_flags_from_environment_are_truthy_words(raw, expected):
    env = {} if raw is None else {"FIRMA_RUN_VZ_GUEST": raw, "FIRMA_RUN_VZ_STRUCTURAL_NETWORK": raw}
    inputs = vz_inputs_from_environ(env)
    assert inputs.guest is expected and inputs.structural_network is expected


def test_backend_never_reads_the_process_environment(tmp_path, monkeypatch):
    files = guest_files(tmp_path)
    monkeypatch.setenv("FIRMA_RUN_VZ_GUEST", "1")
    monkeypatch.setenv("FIRMA_RUN_VZ_STRUCTURAL_NETWORK", "1")
    for name, key in FIELD.items():
        monkeypatch.setenv(name, files[key])
    sx, _ = fake_sandbox_exec(tmp_path)
    backend = VzBackend()
    proof = backend.prepare(run_plan(tmp_path, VzInputs()), mac_host(str(sx)))
    assert backend.mode is VzMode.COMPATIBILITY and proof.structural is False


# --- validation rows ----------------------------------------------------------------------------

def _case(tmp: Path, name: str, row: str) -> tuple[dict, str]:
    """Valid inputs with `name` broken as `row`; returns (inputs kwargs, expected reason)."""
    files = guest_files(tmp)
    key = FIELD[name]
    if row == "unset":
        files[key] = None
        return files, f"VZ guest mode requires {name}"
    if row == "relative":
        files[key] = "guest/thing"
        return files, f"{name} must be an absolute path: guest/thing"
    if row == "empty":
        files[key] = ""
        # FirmaError keeps messages one trimmed line, so the trailing space of `: <empty>` goes.
        return files, f"{name} must be an absolute path:"
    if row == "missing":
        files[key] = str(tmp / "nope")
        return files, f"{name} does not exist: {tmp / 'nope'}"
    if row == "dangling_link":
        link = tmp / "dangling"
        link.symlink_to(tmp / "gone")
        files[key] = str(link)
        return files, f"{name} does not exist: {link}"
    if row == "directory":
        d = tmp / "adir"
        d.mkdir()
        files[key] = str(d)
        return files, f"{name} must point to a file: {d}"
    if row == "not_executable":
        p = tmp / "noexec"
        p.write_text("#!/bin/sh\n")
        p.chmod(0o644)
        files[key] = str(p)
        return files, f"{name} must be executable: {p}"
    if row == "uninspectable":  # ENAMETOOLONG: a real stat failure that is not "missing"
        p = "/" + "x" * 300
        files[key] = p
        return files, f"failed to inspect {name} {p}: File name too long"
    raise AssertionError(row)


ROWS = ["unset", "relative", "empty", "missing", "dangling_link", "directory", "uninspectable"]
CASES = [(n, r) for n in GUEST_ENV_NAMES for r in ROWS] + [("FIRMA_RUN_VZ_GUEST_RUNNER", "not_executable")]


@pytest.mark.parametrize("name, row", CASES)
def test_validation_row_exact_text_and_nothing_started(tmp_path, name, row):
    files, reason = _case(tmp_path, name, row)
    # A runner that leaves evidence if anything ever starts it.
    if name != "FIRMA_RUN_VZ_GUEST_RUNNER":
        runner, evidence = recording_runner(tmp_path)
        files["runner"] = str(runner)
    else:
        _, evidence = recording_runner(tmp_path)
    with pytest.raises(BackendError) as exc:
        validate_guest_inputs(VzInputs(guest=True, **files))
    assert str(exc.value) == f"backend error (vz): {reason}"
    backend = VzBackend()
    with pytest.raises(BackendError) as exc2:
        backend.prepare(run_plan(tmp_path, VzInputs(guest=True, **files)), mac_host(None))
    assert str(exc2.value) == str(exc.value)
    with pytest.raises(BackendError, match="used before prepare"):
        backend.routing()
    assert list(evidence.iterdir()) == []  # nothing was started
    assert not (tmp_path / "state").exists()  # nothing was written


def test_not_executable_applies_to_the_runner_only(tmp_path):
    files = guest_files(tmp_path)
    for key in ("kernel", "initrd", "rootfs"):
        os.chmod(files[key], 0o600)
    assert validate_guest_inputs(VzInputs(guest=True, **files)).kernel == files["kernel"]


def test_symlinks_to_regular_files_are_accepted_as_given(tmp_path):
    files = guest_files(tmp_path)
    link = tmp_path / "kernel-link"
    link.symlink_to(files["kernel"])
    files["kernel"] = str(link)
    assert validate_guest_inputs(VzInputs(guest=True, **files)).kernel == str(link)


def test_order_runner_kernel_initrd_rootfs_first_failure_wins(tmp_path):
    files = guest_files(tmp_path)
    broken = dict(files, kernel=None, rootfs="rel")
    with pytest.raises(BackendError, match="requires FIRMA_RUN_VZ_GUEST_KERNEL$"):
        validate_guest_inputs(VzInputs(guest=True, **broken))
    broken = dict(files, runner=None, kernel=None)
    with pytest.raises(BackendError, match="requires FIRMA_RUN_VZ_GUEST_RUNNER$"):
        validate_guest_inputs(VzInputs(guest=True, **broken))
    broken = dict(files, initrd=str(tmp_path / "x"), rootfs=None)
    with pytest.raises(BackendError, match="INITRD does not exist"):
        validate_guest_inputs(VzInputs(guest=True, **broken))


def test_each_input_inspected_exactly_once_in_order(tmp_path):
    files = guest_files(tmp_path)
    seen = []

    def counting(path):
        seen.append(path)
        return inspect_path(path)

    sx, _ = fake_sandbox_exec(tmp_path)
    VzBackend(inspect=counting).prepare(run_plan(tmp_path, VzInputs(guest=True, **files)),
                                        mac_host(str(sx)))
    assert seen == [files["runner"], files["kernel"], files["initrd"], files["rootfs"]]


def test_injected_inspection_error_text():
    def broken(path):
        return PathFacts("error", error="Permission denied")

    inputs = VzInputs(guest=True, runner="/r", kernel="/k", initrd="/i", rootfs="/f")
    with pytest.raises(BackendError) as exc:
        validate_guest_inputs(inputs, broken)
    assert str(exc.value) == (
        "backend error (vz): failed to inspect FIRMA_RUN_VZ_GUEST_RUNNER /r: Permission denied")


def test_doctor_style_environ_mapping_is_accepted(tmp_path):
    files = guest_files(tmp_path)
    env = {name: files[key] for name, key in FIELD.items()}
    assert validate_guest_inputs(env).rootfs == files["rootfs"]
    del env["FIRMA_RUN_VZ_GUEST_INITRD"]
    with pytest.raises(BackendError, match="requires FIRMA_RUN_VZ_GUEST_INITRD"):
        validate_guest_inputs(env)


def test_link_loop_counts_as_missing(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert inspect_path(str(loop)) == PathFacts("missing")

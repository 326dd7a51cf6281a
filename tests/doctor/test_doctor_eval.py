"""Pure doctor evaluation over hand-built hosts."""

from __future__ import annotations

import json

import pytest

from firma.doctor import (
    FAIL,
    OK,
    WARN,
    Observations,
    PathFacts,
    evaluate,
    exit_code,
    report_json,
    report_text,
)
from firma.errors import FirmaError
from firma.core.hostfacts import Host
from firma.core.limits import CgroupFacts
from firma.backends.preflight import bwrap_preflight

LINUX = Host(system="linux", machine="x86_64", kernel_osrelease="6.8.0",
             max_user_namespaces="15000", uid=1000, gid=1000, bwrap_path="/usr/bin/bwrap",
             bwrap_version="bubblewrap 0.8.0", mem_total=8 << 30,
             cgroups=CgroupFacts("v2", {c: "/sys/fs/cgroup/user.slice/run-1.scope" for c in ("memory", "pids", "cpu")},
                                 move_self=True))
GOOD = Observations(state_root="/run/user/1000/firma",
                    state_root_facts=PathFacts(True, False, True, 0o700, 1000),
                    kernel_seccomp=True, seccomp_detail="compiles", smoke=(True, "started"))


def by_name(checks):
    return {c.name: c for c in checks}


def test_healthy_linux_host_is_all_ok():
    checks = evaluate(LINUX, GOOD)
    assert [c.name for c in checks] == ["os", "bubblewrap", "user_namespaces", "bwrap_backend",
                                        "seccomp", "limits", "state_dir", "config", "sidecar"]
    assert {c.status for c in checks} == {OK}
    assert exit_code(checks) == 0


def test_limits_say_which_mechanism_and_what_an_unprivileged_host_lacks():
    ok = by_name(evaluate(LINUX, GOOD))["limits"]
    assert ok.status == OK and "cgroup v2" in ok.detail and "memory 4.0 GiB: cgroup v2 memory.max" in ok.detail
    bare = Host(**{**LINUX.__dict__, "cgroups": CgroupFacts(None, {}, why_not="cgroup v1: not writable by uid 1000")})
    warn = by_name(evaluate(bare, GOOD))["limits"]
    assert warn.status == WARN and "not writable by uid 1000" in warn.detail
    assert "memory 4.0 GiB: RLIMIT_DATA" in warn.detail and "--memory / --cpus would be refused" in warn.detail
    assert "Delegate=yes" in warn.remediation


HOSTS = {
    "ok": LINUX,
    "no-bwrap": Host(**{**LINUX.__dict__, "bwrap_path": None, "bwrap_version": None}),
    "bwrap-broken": Host(**{**LINUX.__dict__, "bwrap_version": None}),
    "userns-clone-0": Host(**{**LINUX.__dict__, "unprivileged_userns_clone": "0"}),
    "max-userns-0": Host(**{**LINUX.__dict__, "max_user_namespaces": "0"}),
    "wsl": Host(**{**LINUX.__dict__, "kernel_osrelease": "5.15.0-microsoft-standard-WSL2"}),
}


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_bwrap_verdict_agrees_with_run_preflight(name):
    host = HOSTS[name]
    try:
        bwrap_preflight(host)
        refused = None
    except FirmaError as exc:
        refused = str(exc)
    check = by_name(evaluate(host, GOOD))["bwrap_backend"]
    if refused is None:
        assert check.status == OK
    else:
        assert check.status == FAIL and refused in check.detail
        assert check.remediation and "\n" not in check.remediation
    assert exit_code(evaluate(host, GOOD)) == (0 if refused is None else 1)


def test_userns_check_names_the_sysctl():
    c = by_name(evaluate(HOSTS["max-userns-0"], GOOD))["user_namespaces"]
    assert c.status == FAIL and c.remediation == "sysctl -w user.max_user_namespaces=15000"
    c = by_name(evaluate(HOSTS["userns-clone-0"], GOOD))["user_namespaces"]
    assert c.status == FAIL and "kernel.unprivileged_userns_clone=1" in c.remediation


def test_apparmor_restriction_warns_and_failed_smoke_fails():
    obs = Observations(**{**GOOD.__dict__, "apparmor_restrict_userns": "1",
                          "smoke": (False, "bwrap: setting up uid map: Permission denied")})
    checks = by_name(evaluate(LINUX, obs))
    assert checks["user_namespaces"].status == WARN
    assert "apparmor_restrict_unprivileged_userns" in checks["user_namespaces"].detail
    assert checks["bwrap_backend"].status == FAIL
    assert "uid map" in checks["bwrap_backend"].detail


def test_old_bwrap_fails():
    host = Host(**{**LINUX.__dict__, "bwrap_version": "bubblewrap 0.4.1"})
    c = by_name(evaluate(host, GOOD))["bubblewrap"]
    assert c.status == FAIL and "0.8.0" in c.remediation


def test_wsl_fails_os_check():
    c = by_name(evaluate(HOSTS["wsl"], GOOD))["os"]
    assert c.status == FAIL and "WSL" in c.detail


def test_seccomp_failures():
    no_kernel = Observations(**{**GOOD.__dict__, "kernel_seccomp": False})
    assert by_name(evaluate(LINUX, no_kernel))["seccomp"].status == FAIL
    bad = Observations(**{**GOOD.__dict__, "seccomp_error":
                          "seccomp artifact /x/policy.bpf is a symlink; remove it to rebuild"})
    c = by_name(evaluate(LINUX, bad))["seccomp"]
    assert c.status == FAIL and c.remediation == "remove it to rebuild"


@pytest.mark.parametrize("facts, status", [
    (PathFacts(False), OK),
    (PathFacts(True, False, True, 0o700, 1000), OK),
    (PathFacts(True, False, True, 0o750, 1000), FAIL),
    (PathFacts(True, False, True, 0o700, 0), FAIL),
    (PathFacts(True, True, False, 0o777, 1000), FAIL),
    (PathFacts(True, False, False, 0o600, 1000), FAIL),
])
def test_state_dir(facts, status):
    obs = Observations(**{**GOOD.__dict__, "state_root_facts": facts})
    assert by_name(evaluate(LINUX, obs))["state_dir"].status == status


def test_config_and_sidecar_failures():
    obs = Observations(**{**GOOD.__dict__, "config_path": "/p/firma.toml",
                          "config_error": "/p/firma.toml: invalid TOML", "sidecar_endpoint":
                          "tcp://127.0.0.1:9", "sidecar_error": "Connection refused"})
    checks = by_name(evaluate(LINUX, obs))
    assert checks["config"].status == FAIL and "/p/firma.toml" in checks["config"].remediation
    assert checks["sidecar"].status == FAIL and "tcp://127.0.0.1:9" in checks["sidecar"].detail


def test_macos_checks():
    mac = Host(system="darwin", machine="arm64", sandbox_exec_path="/usr/bin/sandbox-exec",
               uid=501, environ={"FIRMA_RUN_VZ_GUEST": "1"})
    obs = Observations(state_root="/tmp/firma-501", vz_error="VZ guest mode requires "
                       "FIRMA_RUN_VZ_GUEST_KERNEL")
    checks = by_name(evaluate(mac, obs))
    assert "bwrap_backend" not in checks
    assert checks["sandbox_exec"].status == OK
    assert checks["vz_guest_inputs"].status == FAIL
    bare = Host(system="darwin", machine="arm64", uid=501)
    checks = by_name(evaluate(bare, Observations(state_root="/tmp/firma-501")))
    assert checks["sandbox_exec"].status == FAIL
    assert checks["vz_guest_inputs"].status == OK


def test_json_shape_and_text():
    checks = evaluate(HOSTS["no-bwrap"], GOOD)
    doc = json.loads(report_json(checks))
    assert set(doc) == {"checks", "ok"} and doc["ok"] is False
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "remediation"}
        assert c["status"] in ("OK", "WARN", "FAIL")
        assert c["status"] == "OK" or c["remediation"]
    text = report_text(checks)
    assert "FAIL  bubblewrap" in text and "fix: install it with: apt-get install bubblewrap" in text


def test_transparent_egress_probe_result_is_reported():
    from firma.core.record import replace

    ok = by_name(evaluate(LINUX, replace(GOOD, transparent=(True, "the kernel accepts it"))))["transparent_egress"]
    assert ok.status == OK and ok.remediation == ""
    bad = by_name(evaluate(LINUX, replace(GOOD, transparent=(False, "local default route refused: EINVAL"))))["transparent_egress"]
    assert bad.status == FAIL and "EINVAL" in bad.detail and bad.remediation
    assert "transparent_egress" not in by_name(evaluate(LINUX, GOOD))  # not probed: not claimed

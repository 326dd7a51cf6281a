"""Resource limits, pure (DESIGN §5.3): sizes, the request with its defaults, the mechanism chosen
for each limit from a host's cgroup facts, the refusals, the run summary's notes, where the
launcher's groups are, and the steps that make a run's group (v1 and v2)."""

from __future__ import annotations

import pytest

from firma.core import cgroupfs, config as cfgmod, limits
from firma.core.limits import CgroupFacts
from firma.errors import ConfigError, LaunchError

GiB = 1 << 30
MiB = 1 << 20
RAM = 16 * GiB

V1_FACTS = CgroupFacts(limits.V1, {"memory": "/sys/fs/cgroup/memory/u", "pids": "/sys/fs/cgroup/pids", "cpu": "/sys/fs/cgroup/cpu"})
V2_FACTS = CgroupFacts(limits.V2, {c: "/sys/fs/cgroup/user.slice/run-1.scope" for c in ("memory", "pids", "cpu")}, move_self=True)
NO_CGROUP = CgroupFacts(None, {}, why_not="cgroup v1: not writable by uid 1000")


@pytest.mark.parametrize("raw,want", [
    ("512m", 512 * MiB), ("2g", 2 * GiB), ("2GiB", 2 * GiB), ("1.5G", int(1.5 * GiB)), ("64MB", 64 * MiB),
    (1048576, MiB), ("4096", 4096), ("25%", RAM // 4), ("1t", 1 << 40),
])
def test_sizes(raw, want):
    assert limits.parse_size(raw, "--memory", RAM) == want


@pytest.mark.parametrize("raw", ["", "lots", "-1g", "4x", True, "150%", "0%", [1]])
def test_bad_sizes_say_what_is_expected(raw):
    with pytest.raises(ConfigError, match="--memory"):
        limits.parse_size(raw, "--memory", RAM)


def test_a_share_of_ram_is_for_memory_only_and_needs_a_known_ram():
    with pytest.raises(ConfigError, match="memory only"):
        limits.parse_size("10%", "[run].limits.file_size", RAM)
    with pytest.raises(ConfigError, match="RAM is unknown"):
        limits.parse_size("10%", "--memory", None)


def test_defaults_stop_a_runaway_and_leave_room_for_work():
    req = limits.request({}, {}, RAM)
    assert (req.memory, req.pids, req.cpus, req.nofile, req.file_size) == (RAM // 2, 4096, None, 65536, 16 * GiB)
    assert req.explicit == frozenset() and req.mode == limits.STRICT
    assert limits.request({}, {}, None).memory is None  # RAM unknown: no guessed memory limit


def test_command_line_over_config_over_defaults():
    req = limits.request({"memory": "2g", "pids": 500, "nofile": 1024, "mode": "best-effort"},
                         {"memory": "1g", "pids": None, "cpus": "1.5", "mode": None}, RAM)
    assert (req.memory, req.pids, req.cpus, req.nofile) == (GiB, 500, 1.5, 1024)
    assert req.explicit == {"memory", "pids", "cpus", "nofile"} and req.mode == limits.BEST_EFFORT


@pytest.mark.parametrize("cli,match", [
    ({"pids": 3}, "at least 16"), ({"memory": "1m"}, "at least 64m"), ({"cpus": "0"}, "between 0.01"),
    ({"cpus": "many"}, "not a number"), ({"mode": "loose"}, "strict, best-effort or off"),
    ({"mode": "off", "pids": 100}, "conflicts with --pids"),
])
def test_request_refusals_are_one_line(cli, match):
    with pytest.raises(ConfigError, match=match) as e:
        limits.request({}, cli, RAM)
    assert "\n" not in str(e.value)


def test_config_table_is_checked_when_parsed():
    cfg = cfgmod.parse('[run]\nlimits = { memory = "4g", pids = 2048, cpus = 2, mode = "best-effort" }\n', "/c/firma.toml")
    assert cfg.run["limits"] == {"memory": "4g", "pids": 2048, "cpus": 2, "mode": "best-effort"}
    for bad, match in (('{ swap = "1g" }', "unknown key 'swap'"), ('{ pids = "many" }', "whole number"),
                       ('{ mode = "lax" }', "mode must be"), ('"4g"', "must be a table")):
        with pytest.raises(ConfigError, match=match):
            cfgmod.parse(f"[run]\nlimits = {bad}\n", "/c/firma.toml")


def _by_name(plan):
    return {e.name: e for e in plan.entries}


def test_v1_as_root_each_limit_by_its_controller():
    plan = limits.plan_limits(limits.request({}, {"memory": "1g", "pids": 64, "cpus": "0.5"}, RAM), V1_FACTS)
    assert plan.cgroup_version == "v1" and set(plan.cgroup_parents) == {"memory", "pids", "cpu"}
    writes = [(w.controller, w.file, w.value, w.optional) for w in plan.writes]
    assert writes == [
        ("memory", "memory.limit_in_bytes", str(GiB), False),
        ("memory", "memory.memsw.limit_in_bytes", str(GiB), True),
        ("pids", "pids.max", "64", False),
        ("cpu", "cpu.cfs_period_us", "100000", False),
        ("cpu", "cpu.cfs_quota_us", "50000", False),
    ]
    # RLIMIT_NPROC stays as the floor, above pids.max so the counting cgroup answers first
    assert dict(plan.rlimits) == {"NPROC": 64 + limits.NPROC_MARGIN, "NOFILE": 65536, "FSIZE": 16 * GiB}
    e = _by_name(plan)
    assert e["memory"].scope.startswith("the sandbox") and e["memory"].enforced and not e["memory"].best_effort
    assert "pids.max" in e["pids"].mechanism and e["cpus"].value == "0.5"


def test_v2_uses_the_unified_files_and_moves_the_launcher():
    plan = limits.plan_limits(limits.request({}, {"cpus": "2"}, RAM), V2_FACTS)
    files = {w.file: w.value for w in plan.writes}
    assert files == {"memory.max": str(RAM // 2), "memory.swap.max": "0", "pids.max": "4096", "cpu.max": "200000 100000"}
    assert plan.move_self and plan.cgroup_version == "v2"


def test_without_cgroups_defaults_are_labelled_best_effort():
    plan = limits.plan_limits(limits.request({}, {}, RAM), NO_CGROUP)
    e = _by_name(plan)
    assert e["memory"].mechanism == "RLIMIT_DATA" and e["memory"].scope == "each process" and e["memory"].best_effort
    assert "not writable" in e["memory"].note
    assert e["pids"].mechanism.startswith("RLIMIT_NPROC") and e["pids"].scope == "the sandbox" and not e["pids"].best_effort
    assert dict(plan.rlimits) == {"DATA": RAM // 2, "NPROC": 4096, "NOFILE": 65536, "FSIZE": 16 * GiB}
    assert plan.writes == () and plan.cgroup_version is None


@pytest.mark.parametrize("cli,flag", [({"memory": "1g"}, "--memory"), ({"cpus": "1"}, "--cpus")])
def test_an_explicit_limit_the_host_cannot_enforce_refuses(cli, flag):
    with pytest.raises(LaunchError) as e:
        limits.plan_limits(limits.request({}, cli, RAM), NO_CGROUP)
    assert str(e.value).startswith(f"{flag} cannot be enforced on this host") and "best-effort" in str(e.value)
    plan = limits.plan_limits(limits.request({}, {**cli, "mode": "best-effort"}, RAM), NO_CGROUP)
    entry = _by_name(plan)["memory" if flag == "--memory" else "cpus"]
    assert entry.best_effort and entry.explicit and plan.mode == "best-effort"


def test_never_more_than_the_caller_has():
    plan = limits.plan_limits(limits.request({}, {}, RAM), NO_CGROUP, {"NOFILE": 1024, "NPROC": 100, "FSIZE": None})
    assert dict(plan.rlimits)["NOFILE"] == 1024 and dict(plan.rlimits)["NPROC"] == 100
    assert "caller's hard limit (1024)" in _by_name(plan)["nofile"].note
    assert _by_name(plan)["pids"].value == "100"


def test_off_has_no_mechanism_and_says_so():
    plan = limits.plan_limits(limits.request({}, {"mode": "off"}, RAM), V1_FACTS)
    assert plan.writes == () and plan.rlimits == () and not plan.cgroup_parents
    assert all(not e.enforced and e.note == "--limits off" for e in plan.entries)


def test_contract_v1_backends_carry_no_limits():
    plan = limits.not_enforced(limits.request({}, {}, RAM), "runner")
    assert not plan.enforced_by_firma and all(not e.enforced for e in plan.entries)
    assert plan.as_json()["enforced_by_firma"] is False
    with pytest.raises(LaunchError, match="--memory, --pids cannot be enforced by the vz backend"):
        limits.not_enforced(limits.request({}, {"memory": "1g", "pids": 100}, RAM), "vz")
    assert limits.not_enforced(limits.request({}, {"pids": 100, "mode": "best-effort"}, RAM), "vz").mode == "best-effort"


def test_notes_name_the_limit_that_was_hit():
    plan = limits.plan_limits(limits.request({}, {"memory": "256m", "pids": 64}, RAM), V1_FACTS)
    assert limits.limit_notes(plan, {"oom_kill": 0, "pids_max": 0}, 0) == ()
    notes = limits.limit_notes(plan, {"oom_kill": 2, "pids_max": 7}, 137)
    assert notes == ("memory limit reached (256 MiB): the kernel ended 2 process(es) of the run out of memory (--memory)",
                     "process limit reached (64): 7 fork(s) refused (--pids)")
    assert "SIGXFSZ" in limits.limit_notes(plan, {}, 128 + 25)[0]
    # no memory cgroup: an OOM counter cannot exist, nothing is claimed
    assert limits.limit_notes(limits.plan_limits(limits.request({}, {}, RAM), NO_CGROUP), {"oom_kill": 1}, 137) == ()


PROC_CGROUP_V1 = """9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpu,cpuacct:/user/x
0::/
"""
MOUNTINFO_V1 = """30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_launcher_groups_v1_per_controller():
    g = cgroupfs.launcher_groups(PROC_CGROUP_V1, MOUNTINFO_V1)
    assert g.v1 == {"memory": "/sys/fs/cgroup/memory/process_api/abc", "pids": "/sys/fs/cgroup/pids",
                    "cpu": "/sys/fs/cgroup/cpu,cpuacct/user/x"}
    assert g.v2 == "/sys/fs/cgroup/unified" and g.v2_is_root


def test_launcher_groups_v2_below_a_mount_root_and_escaped_names():
    # A container's cgroup namespace mounts its own group as the root of the mount.
    proc = "0::/docker/abc/sub group\n"
    mi = "40 30 0:40 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    g = cgroupfs.launcher_groups(proc, mi)
    assert g.v2 == "/sys/fs/cgroup/sub group" and not g.v2_is_root
    esc = "41 30 0:41 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert cgroupfs.launcher_groups("0::/a\n", esc).v2 == "/mnt/cg two/a"
    # a group outside what the mount shows is not reachable through it
    assert cgroupfs.launcher_groups("0::/other\n", mi).v2 is None


def test_steps_v1_write_limits_and_pay_the_grace_period_before_the_sandbox_exists():
    plan = limits.plan_limits(limits.request({}, {"memory": "1g"}, RAM), V1_FACTS)
    steps = cgroupfs.cgroup_steps(plan, "firma-sbx_1", 10)
    # no --cpus: the cpu hierarchy is not touched
    assert [(s.action, s.path, s.value) for s in steps] == [
        ("mkdir", "/sys/fs/cgroup/memory/u/firma-sbx_1", ""),
        ("mkdir", "/sys/fs/cgroup/pids/firma-sbx_1", ""),
        ("limit", "/sys/fs/cgroup/memory/u/firma-sbx_1/memory.limit_in_bytes", str(GiB)),
        ("limit", "/sys/fs/cgroup/memory/u/firma-sbx_1/memory.memsw.limit_in_bytes", str(GiB)),
        ("limit", "/sys/fs/cgroup/pids/firma-sbx_1/pids.max", "4096"),
        # the launcher into the group it is already in: a no-op move that waits out the RCU grace
        # period while bwrap starts, so the sandbox's moves after AWAIT are quick
        ("write", "/sys/fs/cgroup/memory/u/cgroup.procs", "10"),
        ("await", "", ""),
        ("join", "/sys/fs/cgroup/memory/u/firma-sbx_1/cgroup.procs", ""),
        ("join", "/sys/fs/cgroup/pids/firma-sbx_1/cgroup.procs", ""),
    ]
    assert steps[3].optional and not steps[2].optional


def test_steps_v2_leaf_for_the_launcher_before_the_controllers():
    plan = limits.plan_limits(limits.request({}, {}, RAM), V2_FACTS)
    parent = "/sys/fs/cgroup/user.slice/run-1.scope"
    steps = cgroupfs.cgroup_steps(plan, "firma-sbx_1", 10)
    assert [(s.action, s.path, s.value) for s in steps[:6]] == [
        ("mkdir", f"{parent}/firma-sbx_1", ""),
        ("mkdir-leaf", f"{parent}/firma-sbx_1.launcher", ""),
        ("write", f"{parent}/firma-sbx_1.launcher/cgroup.procs", "10"),
        ("await", "", ""),
        ("join", f"{parent}/firma-sbx_1/cgroup.procs", ""),
        ("write", f"{parent}/cgroup.subtree_control", "+memory +pids"),
    ]
    assert {s.path.rsplit("/", 1)[1] for s in steps[6:]} == {"memory.max", "memory.swap.max", "pids.max"}
    assert all(s.action == "limit" for s in steps[6:])


def test_trusted_limit_tables_merge_key_by_key():
    user = cfgmod.parse('[run]\nlimits = { memory = "4g" }\n', "/u/config.toml")
    project = cfgmod.parse('[run]\nlimits = { pids = 300 }\n', "/w/.firma/firma.toml")
    merged = cfgmod.merge([user.run, project.run])
    assert merged["limits"] == {"memory": "4g", "pids": 300}


def test_an_untrusted_project_config_can_only_lower_limits():
    from firma.core import configtrust

    text = '[run]\nlimits = { memory = "64g", pids = 100, cpus = 1, mode = "off" }\n'
    narrowed, ignored = configtrust.narrow(cfgmod.parse(text, "/w/.firma/firma.toml"))
    assert ignored == ("limits.mode",) and narrowed.run["limits"] == {"memory": "64g", "pids": 100, "cpus": 1}
    settings = configtrust.union_lists({"limits": {"pids": 2000}}, narrowed.run)
    assert settings["limits"] == {"pids": 2000} and settings[limits.CEILING] == narrowed.run["limits"]
    req = limits.request(settings["limits"], {}, RAM, settings[limits.CEILING])
    # pids and cpus are lowered (and count as asked for); 64g is above the default and is not honoured
    assert (req.memory, req.pids, req.cpus) == (RAM // 2, 100, 1.0) and req.explicit == {"pids", "cpus"}
    assert req.mode == limits.STRICT

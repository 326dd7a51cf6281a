"""Resource limits (DESIGN §5.3), for real: the run's cgroup (v1 controllers as root here), the
rlimits floor (an unprivileged caller: RLIMIT_NPROC in the sandbox's user namespace, RLIMIT_DATA
per process), tmpfs sizes, the proof's entries, the run summary's note when a limit is hit, and
nothing of the run's cgroup left afterwards. Bounded: far below the machine's size (a few
hundred MiB, 200 processes at most), and everything started is gone after the run."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time

import pytest

from linux_support import HERE, SYSTEM_PYTHON, base_env, firma_cmd, require_tools, run_firma
from unprivileged_support import PY, make_install, remove_install

from firma.host import cgroup_facts

# Start up to 200 short sleeps; print how many started before fork failed.
FORK_LOOP = (
    "import os, time\n"
    "n = 0\n"
    "for _ in range(200):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        time.sleep(3); os._exit(0)\n"
    "    n += 1\n"
    "print(n, flush=True)\n"
)

# Allocate and touch N MiB (argv[1]); print "held" when all of it is resident.
ALLOC = (
    "import sys\n"
    "b = bytearray(int(sys.argv[1]) << 20)\n"
    "for i in range(0, len(b), 4096):\n"
    "    b[i] = 1\n"
    "print('held', flush=True)\n"
)


def _proof(tmp_path) -> dict:
    (p,) = (tmp_path / "state" / "proofs").glob("sbx_*.json")
    return json.loads(p.read_text())


def _entries(doc) -> dict:
    return {e["name"]: e for e in doc["limits"]["entries"]}


def _run_groups() -> list[str]:
    """Every run group firma has under the launcher's own groups right now."""
    facts = cgroup_facts()
    return [d for parent in facts.parents.values() for d in glob.glob(os.path.join(parent, "firma-sbx_*"))]


def _require_cgroup_v1_or_v2() -> None:
    facts = cgroup_facts()
    if not {"memory", "pids"} <= set(facts.parents):
        pytest.fail(f"these tests need memory and pids cgroups firma may create as root: {facts.why_not}")


def test_a_fork_loop_stops_at_the_pids_cap(tmp_path):
    require_tools()
    _require_cgroup_v1_or_v2()
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = subprocess.run([SYSTEM_PYTHON, "-c", FORK_LOOP], capture_output=True, text=True, timeout=60)
    assert int(outside.stdout) == 200  # control: the same bounded loop goes past the cap outside
    before = _run_groups()
    p = run_firma(["run", "--pids", "64", "--", SYSTEM_PYTHON, "-c", FORK_LOOP], cwd=ws,
                  env=base_env(tmp_path), timeout=60)
    assert p.returncode == 0, p.stderr
    started = int(p.stdout)
    assert 10 < started < 64, started  # the shell, python and the loop's children share the 64
    # the cgroup counted the refusal and the run summary names the limit
    assert "process limit reached (64)" in p.stderr and "fork(s) refused (--pids)" in p.stderr, p.stderr
    pids = _entries(_proof(tmp_path))["pids"]
    assert pids["value"] == "64" and "pids.max" in pids["mechanism"] and pids["enforced"] and pids["explicit"]
    assert not set(_run_groups()) - set(before)  # the run's group is gone (older leftovers may be swept)


def test_memory_beyond_the_cap_is_killed_and_reported(tmp_path):
    """300 MiB touched under --memory 128m: the kernel kills it (inside the run's group only),
    the agent's status (137) is kept and the summary names the limit. 32 MiB under the same cap
    is fine; 300 MiB outside is fine (control)."""
    require_tools()
    _require_cgroup_v1_or_v2()
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = subprocess.run([SYSTEM_PYTHON, "-c", ALLOC, "300"], capture_output=True, text=True, timeout=60)
    assert outside.stdout.strip() == "held"  # control
    env = base_env(tmp_path)
    small = run_firma(["run", "--memory", "128m", "--", SYSTEM_PYTHON, "-c", ALLOC, "32"], cwd=ws, env=env)
    assert small.returncode == 0 and small.stdout.strip() == "held", small.stderr
    assert "memory limit reached" not in small.stderr
    big = run_firma(["run", "--memory", "128m", "--", SYSTEM_PYTHON, "-c", ALLOC, "300"], cwd=ws, env=env)
    assert big.returncode == 137 and "held" not in big.stdout, (big.returncode, big.stderr)
    assert "memory limit reached (128 MiB): the kernel ended" in big.stderr, big.stderr
    assert "ended with status 137" in big.stderr


def test_tmpfs_mounts_are_sized(tmp_path):
    """/tmp inside is a tmpfs of the planned size (statfs): half the run's memory cap, so filling
    it ends with ENOSPC rather than an out-of-memory kill; a masked secret directory is a 1 MiB
    tmpfs. Control: the same writes in the workspace succeed."""
    require_tools()
    _require_cgroup_v1_or_v2()
    env = base_env(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "home" / ".ssh").mkdir(parents=True, exist_ok=True)
    probe = (
        "import errno, os\n"
        "st = os.statvfs('/tmp'); print(st.f_blocks * st.f_frsize)\n"
        "def fill(path, mib):\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            for _ in range(mib):\n"
        "                f.write(b'x' * (1 << 20))\n"
        "            f.flush(); os.fsync(f.fileno())\n"
        "        return 'ok'\n"
        "    except OSError as e:\n"
        "        return errno.errorcode[e.errno]\n"
        "    finally:\n"
        "        os.unlink(path) if path.startswith('/tmp') else None\n"
        "print(fill(os.path.expanduser('~/.ssh/filler'), 2), fill('small', 2), fill('/tmp/filler', 130))\n"
    )
    p = run_firma(["run", "--quiet", "--memory", "256m", "--", SYSTEM_PYTHON, "-c", probe], cwd=ws, env=env)
    assert p.returncode == 0, p.stderr
    size_line, fills = p.stdout.splitlines()
    tmpfs = _entries(_proof(tmp_path))["tmpfs"]
    assert tmpfs["value"] == "128 MiB" and tmpfs["note"] == "counted against the memory limit"
    assert int(size_line) == 128 << 20
    assert fills.split() == ["ENOSPC", "ok", "ENOSPC"]
    assert os.path.getsize(ws / "small") == 2 << 20  # control


def test_the_proof_lists_each_limit_and_the_sandbox_alone_is_in_the_group(tmp_path):
    """Default limits as root: each entry with its mechanism; while the agent runs, bwrap and the
    sandbox's processes are in the run's group and the launcher and its services process are
    not; afterwards the group is gone."""
    require_tools()
    _require_cgroup_v1_or_v2()
    ws = tmp_path / "ws"
    ws.mkdir()
    before = set(_run_groups())
    script = "echo $$ > ready; while [ ! -e go ]; do sleep 0.05; done"
    proc = subprocess.Popen(firma_cmd("run", "--quiet", "--", "sh", "-c", script), cwd=ws, env=base_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (ws / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        groups = sorted(set(_run_groups()) - before)
        assert groups, "no run group while the agent runs"
        # The services process is forked once the agent is released: wait for it to exist.
        while True:
            children = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == proc.pid]
            comms = {pid: _comm(pid) for pid in children}
            if len(comms) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        members = {int(x) for g in groups for x in open(os.path.join(g, "cgroup.procs")).read().split()}
        services = [pid for pid, c in comms.items() if c != "bwrap"]
        bwrap = [pid for pid, c in comms.items() if c == "bwrap"]
        assert bwrap and set(bwrap) <= members  # bwrap and, below it, the sandbox
        assert proc.pid not in members and services and not set(services) & members, (comms, members)
        assert any(_comm(m) == "sh" for m in members)  # the agent itself
    finally:
        (ws / "go").write_text("")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    doc = _proof(tmp_path)
    entries = _entries(doc)
    assert set(entries) == {"memory", "pids", "cpus", "nofile", "file_size", "tmpfs"}
    assert "memory" in entries["memory"]["mechanism"] and entries["memory"]["scope"].startswith("the sandbox")
    assert entries["memory"]["enforced"] and not entries["memory"]["best_effort"]
    assert entries["cpus"]["value"] == "none" and not entries["cpus"]["enforced"]
    assert entries["nofile"]["mechanism"] == "RLIMIT_NOFILE" and entries["file_size"]["mechanism"] == "RLIMIT_FSIZE"
    assert doc["limits"]["mode"] == "strict" and doc["limits"]["enforced_by_firma"] is True
    check = {c["name"]: c for c in doc["checks"]}["limits"]
    assert check["ok"] and "holds the sandbox" in check["detail"] and "cgroup mounts read-only inside" in check["detail"]
    assert not set(groups) & set(_run_groups())  # this run's groups are gone (older leftovers may be swept)


def test_cpus_are_capped(tmp_path):
    """--cpus 0.2: a busy loop gets about a fifth of a CPU (CPU time over wall time, both read
    inside); without the cap the same loop gets a whole one (control)."""
    require_tools()
    if "cpu" not in cgroup_facts().parents:
        pytest.fail(f"no cpu cgroup firma may create as root: {cgroup_facts().why_not}")
    ws = tmp_path / "ws"
    ws.mkdir()
    loop = ("import time\n"
            "w, c = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - w < 1.5:\n"
            "    pass\n"
            "print(round((time.process_time() - c) / (time.monotonic() - w), 2))\n")
    env = base_env(tmp_path)
    free = run_firma(["run", "--quiet", "--", SYSTEM_PYTHON, "-c", loop], cwd=ws, env=env)
    capped = run_firma(["run", "--quiet", "--cpus", "0.2", "--", SYSTEM_PYTHON, "-c", loop], cwd=ws, env=env)
    assert free.returncode == 0 and capped.returncode == 0, (free.stderr, capped.stderr)
    assert float(free.stdout) > 0.6, free.stdout  # control: an uncapped loop uses most of a CPU
    assert float(capped.stdout) < 0.35, capped.stdout


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


# --- an unprivileged caller: no cgroup it may create here, the rlimits floor -------------------------

@pytest.fixture(scope="module")
def install():
    require_tools()
    inst = make_install("firma-limits-", extra_tree=HERE)
    yield inst
    remove_install(inst)


def _as_user(inst, argv, cwd, timeout=120):
    return subprocess.run(inst.argv(*argv), cwd=cwd, env=inst.env(), capture_output=True, text=True, timeout=timeout)


def _user_ws(inst, name):
    ws = inst.root / name
    ws.mkdir()
    os.chown(ws, inst.user.pw_uid, inst.user.pw_gid)
    return ws


@pytest.mark.unprivileged
def test_unprivileged_fork_loop_stops_at_rlimit_nproc(install):
    ws = _user_ws(install, "ws-fork")
    drive = str(install.root / "tests" / "linux_drive.py")
    outside = _as_user(install, [SYSTEM_PYTHON, "-c", FORK_LOOP], ws)
    assert int(outside.stdout) == 200  # control: the same user, outside, goes past the cap
    p = _as_user(install, [PY, drive, "run", "--pids", "64", "--proof-file", str(ws / "proof.json"), "--",
                           SYSTEM_PYTHON, "-c", FORK_LOOP], ws)
    assert p.returncode == 0, p.stderr
    assert 10 < int(p.stdout) < 64, p.stdout
    doc = json.loads((ws / "proof.json").read_text())
    pids = _entries(doc)["pids"]
    facts = _user_facts(install, ws)
    if "pids" in facts["parents"]:
        assert "pids.max" in pids["mechanism"]
    else:
        assert pids["mechanism"] == "RLIMIT_NPROC in the sandbox's user namespace" and pids["scope"] == "the sandbox"


def _user_facts(inst, ws) -> dict:
    p = _as_user(inst, [PY, "-c", "import json; from firma.host import cgroup_facts; f = cgroup_facts(); "
                        "print(json.dumps({'version': f.version, 'parents': dict(f.parents)}))"], ws)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.unprivileged
def test_unprivileged_explicit_memory_refuses_or_best_effort_says_so(install):
    """Without a memory cgroup the caller may create, `--memory 1g` is refused in one line and
    nothing starts; `--limits best-effort` runs with RLIMIT_DATA on each process, labelled so in
    the proof, and the agent sees that cap."""
    ws = _user_ws(install, "ws-mem")
    facts = _user_facts(install, ws)
    if "memory" in facts["parents"]:
        pytest.fail(f"this host delegates a memory cgroup to an unprivileged user ({facts}); the refusal "
                    "cannot be shown here")
    drive = str(install.root / "tests" / "linux_drive.py")
    refused = _as_user(install, [PY, drive, "run", "--memory", "1g", "--", "sh", "-c", "touch started"], ws)
    assert refused.returncode != 0 and not (ws / "started").exists()
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert any(line.startswith("[ERR]") and "--memory cannot be enforced on this host" in line for line in errors), refused.stderr
    p = _as_user(install, [PY, drive, "run", "--memory", "1g", "--limits", "best-effort", "--proof-file",
                           str(ws / "proof.json"), "--", "sh", "-c", "ulimit -d"], ws)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str((1 << 30) // 1024)  # RLIMIT_DATA in KiB, as the agent sees it
    doc = json.loads((ws / "proof.json").read_text())
    mem = _entries(doc)["memory"]
    assert mem["mechanism"] == "RLIMIT_DATA" and mem["scope"] == "each process" and mem["best_effort"] and mem["explicit"]
    assert doc["limits"]["mode"] == "best-effort"
    assert any(w["setting"] == "limits" for w in doc["weakenings"])


def test_a_group_that_cannot_be_made_refuses_and_leaves_nothing(tmp_path):
    """The run's group is made in a plain directory standing in for a hierarchy whose limit files
    do not exist: the launch is refused in one line and what was made is removed. Stale groups
    of dead launchers (empty, older than a minute) are swept; a young one and other names stay."""
    from firma.backends.bwrap.cgroup import STALE_SECS, RunCgroup, sweep_stale
    from firma.core import limits
    from firma.errors import LaunchError

    parent = tmp_path / "memory"
    parent.mkdir()
    facts = limits.CgroupFacts(limits.V1, {"memory": str(parent)})
    plan = limits.plan_limits(limits.request({}, {"memory": "1g"}, 8 << 30), facts)
    cg = RunCgroup(plan, "firma-sbx_test")
    with pytest.raises(LaunchError) as e:
        cg.create(lambda: (1, 2))
    assert "cannot make the run's cgroup (limit " in str(e.value) and "\n" not in str(e.value)
    assert (parent / "firma-sbx_test").is_dir()  # made, then failed
    assert cg.remove() is None and list(parent.iterdir()) == []
    old, young, other = parent / "firma-sbx_old", parent / "firma-sbx_young", parent / "keep-me"
    for d in (old, young, other):
        d.mkdir()
    os.utime(old, (time.time() - STALE_SECS - 5,) * 2)
    os.utime(other, (time.time() - STALE_SECS - 5,) * 2)
    assert sweep_stale(str(parent), time.time()) == [str(old)]
    assert sorted(p.name for p in parent.iterdir()) == ["firma-sbx_young", "keep-me"]

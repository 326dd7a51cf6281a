"""backends/external.py: the contract is written privately and the runner started on it exactly,
with stdio, signals and exit status preserved and the contract removed afterwards. Real processes;
evidence comes from what the fake runner recorded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from firma.backends import external
from firma.core.contract import build_contract, contract_json
from firma.errors import ContractError, LaunchError
from vz_fixtures import SECRET_VALUE, RecordingHooks, envelope, mode_of, recording_runner


def _launch(tmp_path, runner, env=None, contract_path=None, **kw):
    envl = envelope(tmp_path, env=env, **kw)
    contract = build_contract(envl, str(runner))
    path = contract_path or os.path.join(envl.runtime_dir, "runner", "launch.json")
    rec = RecordingHooks()

    async def go():
        child = await external.launch_contract(
            backend="runner", runner_path=str(runner), contract=contract,
            contract_path=path, hooks=rec.hooks())
        return child, await child.wait()

    child, status = asyncio.run(go())
    return child, status, path, rec, contract


def test_runner_gets_exactly_two_arguments_and_a_private_contract(tmp_path, monkeypatch):
    # The test process itself holds a capability token; the runner must never see it.
    monkeypatch.setenv("FIRMA_CAPABILITY_TOKEN", SECRET_VALUE)
    runner, out = recording_runner(tmp_path)
    child, status, path, rec, contract = _launch(
        tmp_path, runner, env={"FIRMA_CAPABILITY_TOKEN": SECRET_VALUE})
    assert status == 0
    assert (out / "argc").read_text().strip() == "2"
    assert (out / "argv").read_text().splitlines() == ["--launch-contract", path]
    assert os.path.isabs(path)
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"
    copy = (out / "contract.json").read_text()
    assert copy == contract_json(contract)
    assert json.loads(copy)["runner"]["path"] == str(runner)
    assert SECRET_VALUE not in copy
    runner_env = (out / "env").read_text()
    assert SECRET_VALUE not in runner_env and "FIRMA_CAPABILITY_TOKEN" not in runner_env
    # The runner's environment is firma's own, not the agent's (command.env stays in the contract).
    names = {line.split("=", 1)[0] for line in runner_env.splitlines() if "=" in line} - {"PWD", "SHLVL", "_"}
    assert names <= {"PATH", "HOME", "LANG", "TERM", "PYTHONNOUSERSITE", "PYTHONSAFEPATH"}, names
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in runner_env.splitlines()
    assert json.loads(copy)["command"]["env"]["HTTP_PROXY"] == "http://127.0.0.1:41000"  # the agent's: in the contract
    assert (out / "cwd").read_text().strip() == "/"
    # Removed once the runner exited; the directory stays private.
    assert not os.path.exists(path)
    assert mode_of(os.path.dirname(path)) == 0o700
    [check] = rec.checks
    assert check.name == "launch_contract_private" and check.ok
    assert "mode 0600 in directory mode 0700" in check.detail


def test_runner_exit_status_42_comes_back(tmp_path):
    runner, _ = recording_runner(tmp_path, exit_code=42)
    _, status, path, _, _ = _launch(tmp_path, runner)
    assert status == 42
    assert not os.path.exists(path)


def test_death_by_signal_is_128_plus_n(tmp_path):
    runner, out = recording_runner(tmp_path, extra='kill -TERM $$')
    _, status, _, _, _ = _launch(tmp_path, runner)
    assert (out / "argv").exists()  # it ran
    assert status == 128 + signal.SIGTERM


def test_contract_is_private_even_with_umask_zero(tmp_path):
    old = os.umask(0)
    try:
        runner, out = recording_runner(tmp_path)
        _launch(tmp_path, runner)
    finally:
        os.umask(old)
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"


def test_write_private_refuses_an_existing_file_and_keeps_it(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    f = d / "launch.json"
    f.write_text("old")
    with pytest.raises(ContractError, match="already exists"):
        external.write_private(str(f), "new")
    assert f.read_text() == "old"


def test_write_private_refuses_a_symlink_and_never_writes_through_it(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    target = tmp_path / "victim"
    (d / "launch.json").symlink_to(target)
    with pytest.raises(ContractError):
        external.write_private(str(d / "launch.json"), "x")
    assert not target.exists()


def test_write_private_refuses_a_symlinked_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ContractError, match="is a symlink; firma never follows one"):
        external.write_private(str(tmp_path / "link" / "launch.json"), "x")
    assert list(real.iterdir()) == []


def test_write_private_refuses_an_open_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(ContractError, match="mode 0755; it must be 0700"):
        external.write_private(str(d / "launch.json"), "x")
    assert list(d.iterdir()) == []


def test_write_private_refuses_a_foreign_directory(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test needs root to chown a directory to another uid (CI runs as root)")
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    with pytest.raises(ContractError, match="owned by uid 4242"):
        external.write_private(str(d / "launch.json"), "x")


def test_write_private_creates_missing_parents_private(tmp_path):
    p = tmp_path / "a" / "b" / "launch.json"
    st = external.write_private(str(p), "hello")
    assert p.read_text() == "hello"
    assert mode_of(p) == 0o600 == (st.st_mode & 0o777)
    assert mode_of(tmp_path / "a") == 0o700 == mode_of(tmp_path / "a" / "b")


def test_runner_that_cannot_exec_is_a_launch_error_and_the_contract_is_removed(tmp_path):
    bad = tmp_path / "not-a-program"
    bad.write_bytes(b"\x00\x01garbage")
    bad.chmod(0o755)
    envl = envelope(tmp_path)
    path = os.path.join(envl.runtime_dir, "vz-guest", "vz-guest-launch.json")
    with pytest.raises(LaunchError, match="could not start"):
        asyncio.run(external.launch_contract(
            backend="vz", runner_path=str(bad), contract=build_contract(envl, str(bad)),
            contract_path=path, hooks=RecordingHooks().hooks()))
    assert not os.path.exists(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_file(p: Path, seconds: float = 20.0) -> str:
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if p.exists() and p.read_text().strip():
            return p.read_text().strip()
        time.sleep(0.01)
    raise AssertionError(f"{p} never appeared")


def test_forwarded_signal_reaches_the_runner_and_its_children(tmp_path):
    # The runner starts a grandchild (same process group) and waits; SIGTERM forwarded to the
    # group must reach both. The grandchild records the signal it got.
    gc = tmp_path / "gc.sh"
    gc.write_text(f'#!/bin/sh\ntrap \'echo TERM > "{tmp_path}/gc-got"; exit 0\' TERM\n'
                  f'echo $$ > "{tmp_path}/gc.pid"\nwhile :; do sleep 0.05; done\n')
    gc.chmod(0o755)
    runner, out = recording_runner(
        tmp_path, extra=f'"{gc}" & echo $$ > "$OUT/pid"; trap \'echo TERM > "$OUT/got"; '
                        'wait; exit 7\' TERM; while :; do sleep 0.05; done')
    envl = envelope(tmp_path)
    path = os.path.join(envl.runtime_dir, "runner", "launch.json")

    async def go():
        child = await external.launch_contract(
            backend="runner", runner_path=str(runner), contract=build_contract(envl, str(runner)),
            contract_path=path, hooks=RecordingHooks().hooks())
        await asyncio.to_thread(_wait_file, out / "pid")
        await asyncio.to_thread(_wait_file, tmp_path / "gc.pid")
        assert os.getpgid(child.pid) == child.pid != os.getpgrp()
        child.forward_signal(signal.SIGTERM)
        return await child.wait()

    assert asyncio.run(go()) == 7
    assert (out / "got").read_text().strip() == "TERM"
    assert (tmp_path / "gc-got").read_text().strip() == "TERM"
    assert not os.path.exists(path)


def test_kill_tree_kills_every_process_of_the_group_and_removes_the_contract(tmp_path):
    runner, out = recording_runner(
        tmp_path, extra='sleep 1000 & echo $! > "$OUT/gc.pid"; while :; do sleep 0.05; done')
    envl = envelope(tmp_path)
    path = os.path.join(envl.runtime_dir, "runner", "launch.json")

    async def go():
        child = await external.launch_contract(
            backend="runner", runner_path=str(runner), contract=build_contract(envl, str(runner)),
            contract_path=path, hooks=RecordingHooks().hooks())
        gc_pid = int(await asyncio.to_thread(_wait_file, out / "gc.pid"))
        assert os.path.exists(path) and _pid_alive(gc_pid)
        child.kill_tree()
        assert not os.path.exists(path)
        status = await child.wait()
        child.kill_tree()  # idempotent
        return gc_pid, status

    gc_pid, status = asyncio.run(go())
    assert status == 128 + signal.SIGKILL
    # The orphaned grandchild was SIGKILLed with the group (reaped by init or a subreaper).
    import time
    deadline = time.monotonic() + 20
    while _pid_alive(gc_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pid_alive(gc_pid)


HARNESS = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from firma.backends import external
    from firma.core.contract import build_contract
    from vz_fixtures import RecordingHooks, envelope
    tmp = Path({tmp!r})
    env = envelope(tmp)
    async def main():
        child = await external.launch_contract(
            backend="runner", runner_path={runner!r}, contract=build_contract(env, {runner!r}),
            contract_path=env.runtime_dir + "/runner/launch.json", hooks=RecordingHooks().hooks())
        return await child.wait()
    sys.exit(asyncio.run(main()))
""")


def test_stdio_is_inherited_by_the_runner(tmp_path):
    # Run the launcher in a child Python whose stdin/stdout/stderr are pipes we own: the runner
    # must read our stdin and write to our stdout/stderr directly.
    runner = tmp_path / "cat-runner.sh"
    runner.write_text('#!/bin/sh\nread line\necho "out:$line"\necho "err:$line" >&2\nexit 3\n')
    runner.chmod(0o755)
    code = HARNESS.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), runner=str(runner))
    r = subprocess.run([sys.executable, "-c", code], input="ping\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "out:ping\n"
    assert r.stderr.endswith("err:ping\n")

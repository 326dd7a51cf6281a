"""Files firma writes at a user-given path after the agent ran (--proof-file, --summary-json) land
only where they were meant to (DESIGN §14): the directory is resolved before the agent runs and
written through descriptors that follow no link, so an agent that swaps it for a symlink gets
nothing written anywhere; a symlink inside the workspace is refused before anything starts."""

from __future__ import annotations

import json
import os

from linux_support import base_env, require_tools, run_firma


def test_a_directory_swapped_for_a_link_during_the_run_receives_nothing(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    (ws / "out").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"  # stands for /etc: the agent wants the proof written there
    elsewhere.mkdir()
    swap = f"mv out out.real && ln -s {elsewhere} out"
    p = run_firma(["run", "--quiet", "--proof-file", "out/x.json", "--", "sh", "-c", swap], cwd=ws, env=base_env(tmp_path))
    assert list(elsewhere.iterdir()) == []
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("[ERR]  --proof-file ") and "not written" in p.stderr and "kept at" in p.stderr, p.stderr
    # control: without the swap the proof lands where asked
    (ws / "out").unlink()
    (ws / "out").mkdir()
    p = run_firma(["run", "--quiet", "--proof-file", "out/x.json", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads((ws / "out" / "x.json").read_text())["exit_status"] == 0


def test_a_link_inside_the_workspace_is_refused_before_anything_starts(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, ws / "out")  # planted by an earlier run
    p = run_firma(["run", "--proof-file", "out/x.json", "--", "sh", "-c", "touch ran"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and not (ws / "ran").exists()
    assert p.stderr.startswith(f"[ERR]  {ws}/out is a symlink inside the workspace") and p.stderr.count("\n") == 1
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "state" / "run").exists() or \
        list((tmp_path / "state" / "run").iterdir()) == []


def test_a_symlinked_ancestor_outside_the_workspace_still_works(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    real = tmp_path / "real"
    (real / "proofs").mkdir(parents=True)
    os.symlink(real, tmp_path / "link")  # like a symlinked home or /tmp
    out = tmp_path / "link" / "proofs" / "p.json"
    summary = tmp_path / "link" / "proofs" / "s.json"
    p = run_firma(["run", "--quiet", "--proof-file", str(out), "--summary-json", str(summary), "--", "true"],
                  cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert (real / "proofs" / "p.json").is_file() and json.loads((real / "proofs" / "s.json").read_text())["exit_status"] == 0


def test_log_file_through_a_link_or_in_another_users_directory_is_refused(tmp_path):
    """`firma --log-file` (run as root): a link planted at the name, or a directory another user
    owns, is refused before anything starts; the link's target is untouched. Control: a plain
    path of ours is appended to."""
    import pwd

    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    os.symlink(victim, tmp_path / "log-link")
    p = run_firma(["--log-file", str(tmp_path / "log-link"), "run", "--quiet", "--", "sh", "-c", "touch ran"],
                  cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 1 and p.stderr.startswith("[ERR]  ") and not (ws / "ran").exists(), p.stderr
    assert victim.read_text() == "keep\n"
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, pwd.getpwnam("firma-test").pw_uid, -1)
        p = run_firma(["--log-file", str(theirs / "log"), "run", "--quiet", "--", "true"], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 1 and "owned by uid" in p.stderr and not (theirs / "log").exists(), p.stderr
    mine = tmp_path / "mine.log"
    p = run_firma(["--log-file", str(mine), "run", "--quiet", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0 and mine.read_text(), p.stderr  # control

"""The launch environment (API keys included) never appears on a command line.

Every local user can read /proc/<pid>/cmdline; bwrap gets its options (the `--setenv` pairs)
through `--args FD` instead."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

from linux_support import base_env, firma_cmd


def _cmdlines_containing(needle: bytes) -> list[int]:
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    hits.append(int(entry))
        except OSError:
            continue
    return hits


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def test_api_key_is_in_the_agent_env_but_on_no_command_line(ws, tmp_path):
    secret = "sk-test-" + secrets.token_hex(16)
    # Positive control for the scanner: a process carrying the secret in its argv is found.
    control = subprocess.Popen(["sh", "-c", "sleep 30", "control", secret])
    try:
        time.sleep(0.1)
        assert control.pid in _cmdlines_containing(secret.encode())
    finally:
        control.kill()
        control.wait()

    ready, release = ws / "ready", ws / "release"
    env = base_env(tmp_path, ANTHROPIC_API_KEY=secret)
    script = f'printf %s "$ANTHROPIC_API_KEY" > {ws}/seen; touch {ready}; while [ ! -e {release} ]; do sleep 0.05; done'
    run = subprocess.Popen(
        firma_cmd("run", "--profile", "claude-code", "--", "sh", "-c", script),
        cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(ready)
        hits = _cmdlines_containing(secret.encode())
        release.touch()
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err
    # the agent did receive the key (passthrough of the claude-code profile)...
    assert (ws / "seen").read_text() == secret
    # ...and while it ran, no process on the host showed it on its command line
    assert hits == []

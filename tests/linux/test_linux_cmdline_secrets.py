"""The launch environment (API keys included) never appears on a command line.

Every local user can read /proc/<pid>/cmdline; bwrap gets its options (the `--setenv` pairs)
through `--args FD` instead."""

from __future__ import annotations

import secrets
import subprocess
import time

from linux_support import base_env, firma_cmd, pids_with_cmdline, wait_for


def test_api_key_is_in_the_agent_env_but_on_no_command_line(ws, tmp_path):
    secret = "sk-test-" + secrets.token_hex(16)
    # Positive control for the scanner: a process carrying the secret in its argv is found.
    control = subprocess.Popen(["sh", "-c", "sleep 30", "control", secret])
    try:
        time.sleep(0.1)
        assert control.pid in pids_with_cmdline(secret.encode())
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
        wait_for(ready, run)
        hits = pids_with_cmdline(secret.encode())
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

"""Shared builders for the macOS/contract tests (imported by name; no conftest magic)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from firma.backends.base import LaunchHooks
from firma.core.model import (
    DEFAULT_INVARIANTS,
    ExecutionEnvelope,
    IdentityMode,
    Mount,
    NetworkEndpoints,
    frozen_map,
)

SBX = "sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f"
SECRET_VALUE = "tok-must-never-appear-9f3a"


def envelope(
    tmp: Path,
    *,
    proxy_url: str | None = "http://127.0.0.1:41000",
    dns_stub_addr: str | None = "127.0.0.1:41001",
    env: dict[str, str] | None = None,
    executable: str = "/usr/bin/true",
    args: tuple[str, ...] = ("a", "b c"),
    invariants=DEFAULT_INVARIANTS,
    mask_home_paths: tuple[str, ...] = (),
    home: str | None = None,
    cwd: str | None = None,
    identity_mode: IdentityMode = IdentityMode.SANDBOX_USER,
) -> ExecutionEnvelope:
    runtime = tmp / "state" / "run" / SBX
    base_env = {
        "HOME": str(home or tmp),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HTTP_PROXY": proxy_url or "",
        "FIRMA_RUN_SANDBOX_ID": SBX,
    }
    base_env.update(env or {})
    return ExecutionEnvelope(
        sandbox_id=SBX,
        runtime_dir=str(runtime),
        executable=executable,
        args=args,
        cwd=str(cwd or tmp),
        env=frozen_map(base_env),
        identity_mode=identity_mode,
        home=str(home or tmp),
        seccomp_filter_path=None,
        mounts=(Mount(str(tmp), str(tmp), False), Mount("/usr", "/usr", True)),
        mask_home_paths=mask_home_paths,
        network=NetworkEndpoints(
            proxy_url,
            dns_stub_addr,
            frozen_map({"x-firma-sandbox-id": SBX, "x-firma-user": "u", "x-firma-agent": "a"}),
        ),
        invariants=invariants,
    )


class RecordingHooks:
    def __init__(self) -> None:
        self.checks = []
        self.logs = []

    def hooks(self) -> LaunchHooks:
        async def no_planting(_socks):  # host-loopback backends never plant
            raise AssertionError("serve_planted must not be called for host-loopback routing")

        return LaunchHooks(serve_planted=no_planting, add_check=self.checks.append, log=self.logs.append)


def recording_runner(tmp: Path, exit_code: int = 0, extra: str = "") -> tuple[Path, Path]:
    """A fake runner script: records argv (one per line), the contract copy, its file and
    directory mode and its own environment into an evidence directory, then exits."""
    out = tmp / "runner-evidence"
    out.mkdir(exist_ok=True)
    script = tmp / "fake-runner.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'OUT="{out}"\n'
        'printf "%s\\n" "$#" > "$OUT/argc"\n'
        'for a in "$@"; do printf "%s\\n" "$a"; done > "$OUT/argv"\n'
        'stat -c %a "$2" > "$OUT/mode"\n'
        'stat -c %a "$(dirname "$2")" > "$OUT/dirmode"\n'
        'cp "$2" "$OUT/contract.json"\n'
        'env > "$OUT/env"\n'
        'pwd > "$OUT/cwd"\n'
        f"{extra}\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script, out


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def run_plan(tmp: Path, vz=None, profile: str = "generic"):
    from firma.core.model import Identity, RunPlan, VzInputs

    return RunPlan(
        identity=Identity(sandbox_id=SBX, session_id="sess", profile=profile, agent_id=profile,
                          user="u"),
        backend="vz",
        argv=("/bin/true",),
        cwd=str(tmp),
        home=str(tmp),
        state_root=str(tmp / "state"),
        vz=vz if vz is not None else VzInputs(),
    )


def mac_host(sandbox_exec: str | None = None, system: str = "darwin"):
    from firma.core.hostfacts import Host

    return Host(system=system, machine="arm64", sandbox_exec_path=sandbox_exec)


def guest_files(tmp: Path, runner: Path | None = None) -> dict[str, str]:
    """A valid set of guest inputs: an executable runner and three regular files."""
    d = tmp / "guest"
    d.mkdir(exist_ok=True)
    out = {}
    for name in ("kernel", "initrd", "rootfs"):
        p = d / name
        p.write_bytes(b"\0" * 16)
        out[name] = str(p)
    if runner is None:
        runner = d / "runner"
        runner.write_text("#!/bin/sh\nexit 0\n")
        runner.chmod(0o755)
    out["runner"] = str(runner)
    return out


def fake_sandbox_exec(tmp: Path) -> tuple[Path, Path]:
    """A stand-in for /usr/bin/sandbox-exec on Linux: records `-p <profile>`, the command and its
    environment, then execs the command (no confinement: the SBPL text is what is tested)."""
    out = tmp / "sandbox-exec-evidence"
    out.mkdir(exist_ok=True)
    script = tmp / "sandbox-exec"
    script.write_text(
        "#!/bin/sh\n"
        f'OUT="{out}"\n'
        '[ "$1" = "-p" ] || { echo "fake sandbox-exec: expected -p" >&2; exit 97; }\n'
        'printf "%s" "$2" > "$OUT/profile"\n'
        "shift 2\n"
        'for a in "$@"; do printf "%s\\n" "$a"; done > "$OUT/argv"\n'
        'env > "$OUT/env"\n'
        'exec "$@"\n'
    )
    script.chmod(0o755)
    return script, out

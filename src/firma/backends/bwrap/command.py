"""The agent's command must exist where the sandbox will look for it."""

from __future__ import annotations

import os

from ...core import bwrap_plan
from ...core.hostfacts import Host
from ...core.model import RunPlan
from ...errors import LaunchError
from ...host import which
from .facts import within, xdg_runtime_dir


def require_command(plan: RunPlan, host: Host) -> None:
    """Refuse before anything starts when the command cannot be found: inside, bwrap would only
    say `execvp` failed and exit 1, which reads like the agent's own status. The sandbox sees the
    host's root read-only, so the host lookup with the launch PATH is the sandbox's lookup, less
    what the sandbox hides (fresh tmpfs dirs, /root when the caller is root, masked home paths)
    unless the workspace or a mount shows it again."""
    hidden = bwrap_plan.hidden_dirs(
        home=plan.home, mask_home_paths=plan.mask_home_paths, caller_is_root=host.is_root,
        xdg_runtime_dir=xdg_runtime_dir(host), state_root=plan.state_root,
    ) + plan.mask_paths
    shown = (plan.cwd,) + tuple(m.target for m in plan.mounts) + tuple(
        os.path.join(plan.home, rel) for rel in plan.writable_home_paths
    )

    def hider(path: str) -> str | None:
        """The hidden directory `path` (or what it links to) is under, None if visible inside."""
        for p in dict.fromkeys((path, os.path.realpath(path))):
            if not any(within(p, s) for s in shown):
                for h in hidden:
                    if within(p, h):
                        return h
        return None

    exe = plan.argv[0]
    launch_path = os.pathsep.join(
        e for e in plan.base_env.get("PATH", "").split(os.pathsep) if not (e.startswith("/") and hider(e))
    )
    if "/" in exe:
        path = exe if os.path.isabs(exe) else os.path.join(plan.cwd, exe)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LaunchError(f"command not found or not executable: {exe}; check the path")
    else:
        found = which(exe, launch_path)
        if found is None:
            raise LaunchError(
                f"command not found: {exe} (searched the sandbox PATH {launch_path or '(empty)'}); "
                "install it or give its absolute path"
            )
        path = found
    h = hider(os.path.abspath(os.path.join(plan.cwd, path)))
    if h is not None:
        raise LaunchError(
            f"command {exe} is under {h}, which the sandbox does not show; "
            "install it elsewhere (e.g. /usr/local/bin) or put it in the workspace"
        )


"""The agent's command must exist where the sandbox will look for it."""

from __future__ import annotations

import os

from ...core import bwrap_plan
from ...core.hostfacts import Host
from ...core.model import RunPlan
from ...errors import LaunchError
from ...host import which
from .facts import within, xdg_runtime_dir


_MAX_SHEBANG_DEPTH = 4  # the kernel itself follows at most a few nested interpreters


def _shebang(path: str) -> list[str] | None:
    """The words of `path`'s `#!` line, or None when it is not a script."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    return words or None


def _link_hops(path: str) -> list[str]:
    """`path`, each symlink target on the way (every one must be reachable inside), and the final
    real path."""
    hops = [path]
    p = path
    for _ in range(16):
        try:
            target = os.readlink(p)
        except OSError:
            break
        p = os.path.normpath(os.path.join(os.path.dirname(p), target))
        hops.append(p)
    hops.append(os.path.realpath(path))
    return list(dict.fromkeys(hops))


def interpreter_chain(path: str, launch_path: str, full_path: str = "") -> list[tuple[str, str]]:
    """(script, interpreter) for each `#!` hop from `path`, following `env NAME` through the launch
    PATH (or, when only a hidden entry has it, the full PATH, so the caller names the hidden path)
    and symlinks to their targets (the link and each target must be visible)."""
    out: list[tuple[str, str]] = []
    current = path
    for _ in range(_MAX_SHEBANG_DEPTH):
        words = _shebang(current)
        if words is None:
            break
        interp = words[0]
        if os.path.basename(interp) == "env":
            out.append((current, interp))
            names = [w for w in words[1:] if not w.startswith("-")]
            found = (which(names[0], launch_path) or which(names[0], full_path)) if names else None
            if found is None:
                raise LaunchError(
                    f"{current} runs through `env {names[0] if names else ''}`, which is not on the sandbox PATH; "
                    "install it or change the #! line"
                )
            interp = found
        for p in _link_hops(interp):
            out.append((current, p))
        current = os.path.realpath(interp)
    return out


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
    # A script runs through its `#!` interpreter (and `env NAME` through PATH): each one on the
    # way must be visible inside too, or bwrap only says execvp failed.
    full_path = plan.base_env.get("PATH", "")
    for via, interp in interpreter_chain(os.path.abspath(os.path.join(plan.cwd, path)), launch_path, full_path):
        h = hider(interp)
        if h is not None:
            raise LaunchError(
                f"command {exe} runs through {interp} (the #! line of {via}), which is under {h}, which the "
                "sandbox does not show; recreate it with an interpreter outside it (e.g. /usr/bin/python3)"
            )


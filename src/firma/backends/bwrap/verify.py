"""The sandbox measured from outside, before and just after the agent is released: its
/etc/resolv.conf, its final mount table (masks, protected workspace paths) and the agent's
credentials. Each check goes into the proof; a failed one refuses the launch."""

from __future__ import annotations

import os
import re
import time
from typing import Mapping

from ...core import bwrap_plan, egress
from ...core.model import Check
from ...errors import LaunchError
from ..base import AddCheck, Waits
from .child import BwrapChild, pidfd_of
from .facts import within

_CRED_TIMEOUT = 5.0


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(pid: int) -> dict[str, list[str]]:
    """The final mount table of `pid`'s mount namespace: mount point -> its mount options (the
    last mount at a point wins: it is the one visible there)."""
    top: dict[str, list[str]] = {}
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5:
                    top[unescape(fields[4])] = fields[5].split(",")
    except OSError as exc:
        raise LaunchError(f"cannot read the sandbox mount table: {exc.strerror}") from None
    return top


def read_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f) if k
        )


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []



def verify_resolv_conf(child: BwrapChild, add_check: AddCheck, waits: Waits) -> None:
    """Before release: /etc/resolv.conf as the sandbox sees it (through its root), must be
    ours. bwrap builds the mount namespace before it blocks, so we wait for that."""
    deadline = time.monotonic() + _CRED_TIMEOUT
    seen = ""
    while True:
        try:
            with open(f"/proc/{child.init_pid}/root/etc/resolv.conf") as f:
                seen = f.read()
        except OSError as exc:
            seen = f"unreadable: {exc.strerror}"
        if seen == bwrap_plan.RESOLV_CONF or time.monotonic() > deadline or child.proc.poll() is not None:
            break
        waits.pause(0.0002)
    ok = seen == bwrap_plan.RESOLV_CONF
    add_check(Check("resolv_conf_points_at_stub", ok, " ".join(seen.split())[:200]))
    if not ok and child.proc.poll() is not None:
        # bwrap gave up while building the mount namespace (e.g. a mount target it cannot
        # create); its own one-line reason is already on stderr.
        raise bwrap_gave_up()
    if not ok:
        raise LaunchError("sandbox /etc/resolv.conf does not point at the planted DNS stub; refusing to start the agent")


def bwrap_gave_up() -> LaunchError:
    """bwrap exited while it built the sandbox; its own one-line reason is already on stderr."""
    return LaunchError("bwrap could not build the sandbox (its reason is printed above); "
                       "fix the mount or path it names, then rerun")


def verify_masks(top: Mapping[str, list[str]], plan: bwrap_plan.BwrapPlan, add_check: AddCheck) -> None:
    """Before release: every masked path is a mount point in the sandbox's final mount table
    (`mount_table`, read from outside), so no later mount hid a mask and none was skipped."""
    missing = [p for p in plan.masked if p not in top]
    add_check(
        Check(
            "masked_paths",
            not missing,
            ("mounted over: " + ", ".join(plan.masked))
            + (f"; NOT masked: {', '.join(missing)}" if missing else ""),
        )
    )
    if missing:
        raise LaunchError(f"sandbox paths not masked as planned: {', '.join(missing)}; refusing to start the agent")


def verify_kernel_read_only(top: Mapping[str, list[str]], add_check: AddCheck) -> None:
    """Before release: the global kernel interfaces under /proc (bwrap_plan.PROC_READ_ONLY) are
    read-only mount points in the sandbox's final mount table, read from outside. One this host's
    kernel does not have (no sysrq-trigger) is reported absent."""
    ok_paths: list[str] = []
    absent: list[str] = []
    bad: list[str] = []
    for p in bwrap_plan.PROC_READ_ONLY:
        if p in top:
            (ok_paths if "ro" in top[p] else bad).append(p)
        elif os.path.exists(p):
            bad.append(p)
        else:
            absent.append(p)
    detail = "read-only: " + (", ".join(ok_paths) or "(none)")
    if absent:
        detail += "; absent on this kernel: " + ", ".join(absent)
    if bad:
        detail += "; NOT read-only: " + ", ".join(bad)
    add_check(Check("kernel_interfaces_read_only", not bad, detail))
    if bad:
        raise LaunchError(f"sandbox kernel interfaces not read-only as planned: {', '.join(bad)}; refusing to start the agent")


def verify_protected(top: Mapping[str, list[str]], plan: bwrap_plan.BwrapPlan, add_check: AddCheck) -> None:
    """Before release: each protected path is, in the final mount table, a read-only mount
    point at exactly that path (a bind through a link swapped in meanwhile would land
    elsewhere), and each pinned parent is a mount point (so it cannot be renamed away)."""
    prot = plan.protection
    # A home mask inside the workspace (cwd = $HOME) is mounted later and hides even more.
    hidden = [m for m in plan.masked if not within(prot.workspace, m)]

    def masked(p: str) -> bool:
        return any(within(p, m) for m in hidden)

    bad = [p for p in prot.read_only if "ro" not in top.get(p, ()) and not masked(p)]
    bad += [p for p in prot.pinned if p not in top and not masked(p)]
    detail = "read-only: " + (", ".join(prot.read_only) or "(none present)")
    if prot.absent:
        detail += "; absent, not protected: " + ", ".join(prot.absent)
    if bad:
        detail += "; NOT protected: " + ", ".join(bad)
    add_check(Check("workspace_protected_paths", not bad, detail))
    if bad:
        raise LaunchError(
            f"protected workspace paths not mounted read-only as planned: {', '.join(bad)}; "
            "refusing to start the agent"
        )


def verify_agent(child: BwrapChild, plan: bwrap_plan.BwrapPlan, add_check: AddCheck, waits: Waits) -> None:
    """Read the agent's credentials from outside; refuse if not confined."""
    deadline = time.monotonic() + _CRED_TIMEOUT
    subject = None
    status: dict[str, str] | None = None
    while time.monotonic() < deadline:
        kids = children(child.init_pid)
        if kids:
            pid = kids[0]
            pidfd = pidfd_of(pid)  # pins the pid before reading, so the reading is of it
            try:
                st = read_status(pid)
                pgid = os.getpgid(pid)
            except OSError:  # exited meanwhile
                if pidfd is not None:
                    os.close(pidfd)
            else:
                status, subject = st, "agent"
                child.agent_pid, child.agent_pidfd, child.agent_pgid = pid, pidfd, pgid
                break
        if child.proc.poll() is not None or not os.path.exists(f"/proc/{child.init_pid}"):
            break
        waits.pause(0.0002)
    if status is None:
        # The agent already finished: bwrap's init dropped privileges before forking it and
        # NoNewPrivs is irreversible, so init's credentials bound the agent's.
        try:
            st = read_status(child.init_pid)
            if st.get("CapEff") == "0000000000000000":
                status, subject = st, "sandbox init (agent already exited)"
        except OSError:
            pass
    if status is None:
        add_check(Check("agent_no_capabilities", False, "agent exited before its credentials could be read"))
        return
    capeff = status.get("CapEff", "?")
    nnp = status.get("NoNewPrivs", "?")
    cap_ok = capeff == "0000000000000000"
    nnp_ok = nnp == "1"
    add_check(Check("agent_no_capabilities", cap_ok, f"{subject} CapEff={capeff}"))
    add_check(Check("agent_no_new_privs", nnp_ok, f"{subject} NoNewPrivs={nnp}"))
    add_check(
        Check("agent_uid", True, f"inside uid {plan.inside_uid} gid {plan.inside_gid}")
    )
    # The uid the host sees (this reading is from the host's user namespace): never root, and
    # for a root caller the unprivileged agent uid the idmapped workspace was made for.
    host_uids = status.get("Uid", "?").split()
    uid_ok = len(host_uids) == 4 and set(host_uids) == {str(plan.agent_host_uid)} and plan.agent_host_uid != 0
    staged = "; workspace idmapped to it" if plan.staged else ""
    add_check(Check("agent_host_uid", uid_ok, f"{subject} host uid {'/'.join(host_uids)}{staged}"))
    if not uid_ok:
        raise LaunchError(
            f"sandboxed agent runs as host uid {'/'.join(host_uids)}, not the planned {plan.agent_host_uid}; "
            "refusing to continue"
        )
    if not (cap_ok and nnp_ok):
        raise LaunchError(
            f"sandboxed agent holds privileges (CapEff={capeff}, NoNewPrivs={nnp}); refusing to continue"
        )


def verify_transparent(pid: int, ports: tuple[int, ...], ipv6: bool, add_check: AddCheck) -> None:
    """Before release, from outside: the local default routes are in the sandbox's routing tables
    and a listener is planted on every address for each transparent port (DESIGN §5.4). The
    sandbox's own listeners cannot take these ports any more; nothing else listens yet."""
    def read(name: str) -> str:
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                return f.read()
        except OSError:
            return ""

    v4, v6 = egress.local_default_routes(read("fib_trie"), read("ipv6_route") if ipv6 else "")
    found = egress.listening(read("tcp"), read("tcp6") if ipv6 else "")
    want = {("0.0.0.0", p) for p in ports} | ({("::", p) for p in ports} if ipv6 else set())
    missing = sorted(want - found)
    ok = v4 and (v6 or not ipv6) and not missing
    detail = (f"local 0.0.0.0/0 dev lo: {'present' if v4 else 'MISSING'}; "
              + (f"local ::/0 dev lo: {'present' if v6 else 'MISSING'}; " if ipv6 else "no IPv6 in the sandbox; ")
              + f"listening on every address: {', '.join(map(str, ports)) or 'no port (nothing could be allowed)'}; "
              + f"synthetic names: {egress.SYNTHETIC_V4}" + (f", {egress.SYNTHETIC_V6}" if ipv6 else ""))
    if missing:
        detail += "; NOT listening: " + ", ".join(f"{a}:{p}" for a, p in missing)
    add_check(Check("transparent_egress", ok, detail))
    if not ok:
        raise LaunchError(f"transparent egress not in place as planned ({detail}); refusing to start the agent")

"""The bubblewrap argv as an immutable plan (DESIGN §5). Pure: the caller measures the filesystem
facts (which paths exist and what they are) and passes them in; tests inspect the plan as data.

Mount order matters (a later mount hides an earlier one), so it is fixed here:
  1. `/` read-only, fresh /proc and /dev;
  2. fresh tmpfs over /tmp, /var/tmp, /run, /var/run, $XDG_RUNTIME_DIR and the state root
     (no host unix socket and no firma state is reachable);
  3. when the caller is root: /root, /etc/shadow, /etc/gshadow, /etc/sudoers* masked;
  4. the workspace, profile mounts and writable home paths;
  4b. protected workspace paths (ATTACKS #38): every directory between the workspace and a
     protected path is bound onto itself (a mount point cannot be renamed or removed, so the
     agent cannot swap `.git` for a copy with planted hooks), then the protected path read-only;
     parents before children, all after the workspace bind they would otherwise be hidden by;
  5. masked home paths (after 4, so a mount can never re-expose a secret);
  6. generated /etc files (resolv.conf — also over its symlink target —, hosts, passwd, group)."""

from __future__ import annotations

import posixpath
from typing import Mapping

from ..errors import LaunchError
from . import gitconfig
from .model import ExecutionEnvelope, IdentityMode, RunPlan, frozen_map
from .record import record, field

DIR = "dir"
FILE = "file"
SYMLINK = "symlink"

SANDBOX_HOSTNAME = "firma-sandbox"
ROOT_CALLER_INSIDE_ID = 1000  # the agent never runs as uid 0, even when firma does
# The host uid and gid a root caller's agent runs as (DESIGN §5.1): no account has it, and it lies
# outside the ranges distributions hand out (system and login users, systemd's dynamic users
# 61184-65519, /etc/subuid ranges from 100000, container ranges 524288-1879048191). Host root
# would otherwise own the sandbox's user namespace, so file modes and /proc/sys would not stop it.
ROOT_CALLER_AGENT_ID = 2_000_000_000
# Where, in a private mount namespace of the launcher's child, the idmapped clones of the
# workspace and the other bound sources are attached: a fresh 0755 tmpfs over /root, reachable by
# the unprivileged agent uid whatever the real paths' parents allow. /root is the one directory a
# root caller's sandbox always replaces with its own tmpfs, and nothing the agent uid could run
# lives there (it is 0700 on the host).
STAGE_ROOT = "/root"
STAGE_DIR = "/root/firma-stage"
SYSTEM_TMPFS = ("/tmp", "/var/tmp", "/run", "/var/run")
# Root-only secrets hidden from a root caller's agent (host root owns its user namespace, so file
# modes do not stop it): password hashes and their backups, sudo rules, debconf's stored answers,
# TLS and SSH host private keys.
ROOT_SECRETS = (
    "/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
    "/var/cache/debconf/passwords.dat", "/etc/ssl/private",
    "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_dsa_key",
)

# Workspace paths that run code or set policy *outside* the sandbox later (git hooks and config,
# editor tasks, MCP servers, firma's own project config): bound read-only when they exist.
WORKSPACE_PROTECTED = (
    ".git/hooks",
    ".git/config",
    ".git/info",
    ".gitmodules",
    ".firma",
    ".vscode",
    ".idea",
    ".mcp.json",
    # hooks run by git through other routes: husky (core.hooksPath) and the pre-commit framework
    ".husky",
    ".pre-commit-config.yaml",
    # agent settings (hooks, permissions, MCP servers) read by the next agent run on the host
    ".claude",
    ".codex",
    # a dotfiles checkout is usually linked into $HOME: its shell and git startup files run later
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".gitconfig",
    # submodules' own git dirs (config, hooks): `git status` in the superproject runs their fsmonitor
    ".git/modules",
    # tool configs that run a program the next time the user runs the tool on the host
    ".cargo",  # build.rustc-wrapper, target.*.runner, [alias]
    ".npmrc",  # script-shell, git, node-options
    ".yarnrc",
    ".yarnrc.yml",  # yarnPath: the yarn binary itself
    ".pnpmfile.cjs",  # hooks run by every pnpm install
    ".envrc",  # direnv runs it on `cd`
    ".mise.toml",  # mise hooks and tasks
    "mise.toml",
    ".devcontainer",  # initializeCommand runs on the host
    # editor and agent settings: tasks, hooks, MCP server commands
    ".cursor",
    ".gemini",
    ".windsurf",
    ".zed",
    ".continue",
    ".aider.conf.yml",
)
GIT_DIR = ".git"  # protected itself only when it is a file (a worktree's `gitdir:` pointer)
GIT_CONFIG_MAX = 1 << 20  # bytes of a git config file read to find hooksPath / include paths

RESOLV_CONF = "nameserver 127.0.0.1\noptions ndots:0 timeout:1 attempts:1\n"
# The sandbox's own hostname resolves from the file: otherwise every tool that looks it up (git,
# for one) sends DNS queries for it that the stub can only refuse.
HOSTS = (
    f"127.0.0.1\tlocalhost\n127.0.1.1\t{SANDBOX_HOSTNAME}\n"
    f"::1\tlocalhost ip6-localhost ip6-loopback {SANDBOX_HOSTNAME}\n"
)


@record
class BwrapFacts:
    """Host facts the plan depends on, measured by the backend."""

    caller_uid: int
    caller_gid: int
    # Kind (dir | file | symlink) of every candidate path that exists on the host (lstat).
    kinds: Mapping[str, str] = field(default_factory=frozen_map)
    resolv_conf_target: str | None = None  # realpath of /etc/resolv.conf when it is a symlink
    # realpath of every candidate that is a symlink (its target's kind is in `kinds` too).
    realpaths: Mapping[str, str] = field(default_factory=frozen_map)
    xdg_runtime_dir: str | None = None
    state_root: str | None = None
    # Workspace paths the repository's git config points at (core.hooksPath, include.path):
    # protected like the built-in list (see git_config_refs).
    git_refs: tuple[str, ...] = ()
    # Root caller only: owner (uid, gid) of every source bound into the sandbox, whose idmapped
    # clone shows it as the agent's host uid; and the workspace's ancestors that the agent's
    # uid cannot search (the sandbox could not enter the workspace).
    owners: Mapping[str, tuple[int, int]] = field(default_factory=frozen_map)
    unsearchable: tuple[str, ...] = ()
    # Host RAM in bytes (/proc/meminfo), for the sizes of the sandbox's tmpfs mounts; None: unknown.
    mem_total: int | None = None
    # The run's memory cgroup limit in bytes (None: none): a tmpfs fills up before the group does.
    memory_limit: int | None = None

    @property
    def caller_is_root(self) -> bool:
        return self.caller_uid == 0


@record
class GeneratedFile:
    path: str  # on the host, in the run dir
    target: str  # inside the sandbox
    content: str


@record
class StagedSource:
    """A host path bound into a root caller's sandbox through the stage: `source` is cloned
    (open_tree) and, when `owner` is set, idmapped so that files of that owner are the agent's
    host uid's, then attached at `staged`; bwrap binds `staged`, never `source`."""

    source: str
    staged: str
    kind: str  # DIR | FILE
    owner: tuple[int, int] | None  # (uid, gid) shown as the agent's; None: plain clone (read-only data)


@record
class Protection:
    read_only: tuple[str, ...]  # bound read-only, outermost first
    pinned: tuple[str, ...]  # directories bound onto themselves (rename/rmdir → EBUSY)
    symlinks: tuple[str, ...]  # protected names (or their parents) that are symlinks: refuse
    absent: tuple[str, ...]  # protected paths that do not exist (not protected: for the proof)
    workspace: str = ""


# Global kernel interfaces under /proc that the owner of the sandbox's user namespace could write:
# for a root caller that owner is host root, and a sysctl such as kernel.core_pattern then runs a
# program as host root. Bound read-only over the sandbox's fresh /proc (bwrap 0.8 cannot remount
# them read-only in place); sysrq-trigger exists only with CONFIG_MAGIC_SYSRQ.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger")
_PROC_OPTIONAL = frozenset({"/proc/sysrq-trigger"})


# A tmpfs is host RAM: each writable one the sandbox gets (/tmp, /var/tmp, /run, ...) is capped at
# a quarter of RAM and at most 4 GiB (the kernel's default is half of RAM, per mount), and at half
# of the run's memory cgroup limit, so filling it ends with ENOSPC rather than an out-of-memory
# kill; masks of secrets are empty directories and get 1 MiB. (DESIGN §5.3)
TMPFS_MAX_BYTES = 4 << 30
MASK_TMPFS_BYTES = 1 << 20


def tmpfs_bytes(mem_total: int | None, memory_limit: int | None = None) -> int:
    size = TMPFS_MAX_BYTES if mem_total is None else max(64 << 20, min(TMPFS_MAX_BYTES, mem_total // 4))
    if memory_limit is not None:
        size = min(size, max(16 << 20, memory_limit // 2))
    return size


@record
class BwrapPlan:
    argv: tuple[str, ...]
    command: tuple[str, ...]  # what follows `--`: the agent's executable and arguments
    inside_uid: int
    inside_gid: int
    files: tuple[GeneratedFile, ...]
    masked: tuple[str, ...]  # every path hidden from the agent (for the proof)
    tmpfs: tuple[str, ...]
    protection: Protection = Protection((), (), (), ())
    tmpfs_size: int = TMPFS_MAX_BYTES  # bytes, each writable tmpfs
    agent_host_uid: int = -1  # the agent's uid as the host sees it
    agent_host_gid: int = -1
    staged: tuple[StagedSource, ...] = ()  # root caller: what the launcher's child attaches first


def plan_protected(plan: RunPlan) -> tuple[str, ...]:
    """Run-specific absolute paths to protect besides WORKSPACE_PROTECTED: the config file in
    use, the policy and seccomp policy sources and the user's `[run].protected_paths`. Paths
    outside the workspace are already read-only (the root is) and are dropped."""
    paths = [*plan.config_paths, plan.config_path, plan.policy_path]
    if plan.seccomp_policy is not None:
        paths.append(plan.seccomp_policy.source_policy_path)
    paths += [posixpath.join(plan.cwd, rel) for rel in plan.protected_paths]
    return tuple(
        dict.fromkeys(
            q for q in (posixpath.normpath(p) for p in paths if p) if q != plan.cwd and _under(q, (plan.cwd,))
        )
    )


def git_config_refs(text: str, config_dir: str, worktree: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(hooks dirs, included files) named by one git config file, as absolute paths: hooksPath is
    relative to the worktree, include paths to the including file. `~` paths are left out (they
    are in $HOME, outside the workspace). The file itself is read-only inside the sandbox, so the
    agent cannot craft syntax the reader (firma.core.gitconfig) misses."""
    found = gitconfig.entries(text)
    hooks = [posixpath.normpath(posixpath.join(worktree, v)) for v in gitconfig.hooks_paths(found) if not v.startswith("~")]
    includes = [posixpath.normpath(posixpath.join(config_dir, v)) for v in gitconfig.include_paths(found) if not v.startswith("~")]
    return tuple(hooks), tuple(includes)


def protected_targets(cwd: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Absolute protected paths for the workspace `cwd` (defaults first, then `extra`)."""
    paths = [posixpath.join(cwd, p) for p in (GIT_DIR, *WORKSPACE_PROTECTED)]
    paths += [posixpath.normpath(p) for p in extra if p != cwd and _under(posixpath.normpath(p), (cwd,))]
    return tuple(dict.fromkeys(paths))


def _chain(cwd: str, path: str) -> list[str]:
    """`path` and every directory between `cwd` (excluded) and it, outermost first."""
    rel = posixpath.relpath(path, cwd).split("/")
    return [posixpath.join(cwd, *rel[: i + 1]) for i in range(len(rel))]


def protection(cwd: str, extra: tuple[str, ...], kinds: Mapping[str, str]) -> Protection:
    """Walk each protected path from the workspace with lstat kinds only: a symlink anywhere on
    the way is reported (never followed), a missing component makes the path absent, a file
    where a directory was expected (`.git` as a worktree pointer) ends the walk."""
    git = posixpath.join(cwd, GIT_DIR)
    extras = {posixpath.normpath(p) for p in extra}
    wanted: list[str] = []
    symlinks: list[str] = []
    absent: list[str] = []
    for p in protected_targets(cwd, extra):
        if p == git and kinds.get(git) not in (FILE, SYMLINK) and git not in extras:
            continue  # a .git directory stays writable (commits); its hooks/config do not
        for i, c in enumerate(chain := _chain(cwd, p)):
            k = kinds.get(c)
            if k == SYMLINK:
                symlinks.append(c)
                break
            if k is None or (k == FILE and i < len(chain) - 1):
                absent.append(p)
                break
        else:
            wanted.append(p)
    # A path under another protected path is already read-only (and pinning its parents would
    # re-expose them writable): keep the outermost only.
    ro = [p for p in wanted if not any(q != p and _under(p, (q,)) for q in wanted)]
    pinned = [c for p in ro for c in _chain(cwd, p)[:-1]]
    depth = lambda p: p.count("/")
    return Protection(
        read_only=tuple(sorted(ro, key=depth)),
        pinned=tuple(sorted(dict.fromkeys(pinned), key=depth)),
        symlinks=tuple(dict.fromkeys(symlinks)),
        absent=tuple(absent),
        workspace=cwd,
    )


def symlink_error(link: str) -> LaunchError:
    return LaunchError(
        f"protected workspace path {link} is a symlink (it could point outside the sandbox); "
        "replace it with the real directory or file, then rerun"
    )


def hidden_dirs(
    *, home: str, mask_home_paths, caller_is_root: bool, xdg_runtime_dir: str | None, state_root: str | None
) -> tuple[str, ...]:
    """Directories whose host content the sandbox does not show: the fresh tmpfs dirs, /root
    when the caller is root, and the masked home paths. The workspace and the mounts, bound
    after them, show through again."""
    d = list(SYSTEM_TMPFS) + [p for p in (xdg_runtime_dir, state_root) if p]
    if caller_is_root:
        d.append("/root")
    d += [posixpath.join(home, p) for p in mask_home_paths]
    return tuple(d)


def candidate_paths(
    envelope: ExecutionEnvelope, xdg_runtime_dir: str | None, protected_extra: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """Paths whose kind the backend must measure before building the plan."""
    paths = list(SYSTEM_TMPFS) + list(ROOT_SECRETS) + ["/root", "/etc/resolv.conf"]
    if xdg_runtime_dir:
        paths.append(xdg_runtime_dir)
    paths += [posixpath.join(envelope.home, p) for p in envelope.mask_home_paths]
    paths += list(envelope.mask_paths)
    paths += protected_candidates(envelope.cwd, protected_extra)
    return tuple(dict.fromkeys(paths))


def protected_candidates(cwd: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every component of every protected path: a planted link is found, never followed."""
    return tuple(dict.fromkeys(c for p in protected_targets(cwd, extra) for c in _chain(cwd, p)))


def passwd_text(uid: int, gid: int, home: str) -> str:
    return (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"firma-user:x:{uid}:{gid}:firma sandbox user:{home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )


def group_text(gid: int) -> str:
    return f"root:x:0:\nfirma-user:x:{gid}:\nnogroup:x:65534:\n"


def _mask(path: str, facts: BwrapFacts, masked: list[str]) -> list[str]:
    """Args hiding `path`: an empty tmpfs over a directory, /dev/null over anything else.
    A symlink is masked at its target (a mount over a link lands on the target anyway)."""
    target = facts.realpaths.get(path, path) if facts.kinds.get(path) == SYMLINK else path
    kind = facts.kinds.get(target)
    if kind == DIR:
        masked.append(target)
        return ["--size", str(MASK_TMPFS_BYTES), "--tmpfs", target]
    if kind == FILE:
        masked.append(target)
        return ["--ro-bind", "/dev/null", target]
    return []  # absent (or a dangling link): nothing to hide


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def stage_sources(envelope: ExecutionEnvelope, facts: BwrapFacts, files: tuple[GeneratedFile, ...]) -> tuple[StagedSource, ...]:
    """Root caller: the workspace and every writable or read-only mount source, idmapped from its
    owner to the agent's host uid, and the generated files (plain clones: they sit in the
    launcher's private run directory, which the agent's uid cannot search)."""
    out: list[StagedSource] = []
    idmapped = [envelope.cwd] + [m.source for m in envelope.mounts]
    for src in dict.fromkeys(idmapped):
        kind = facts.kinds.get(src, DIR)
        out.append(StagedSource(src, f"{STAGE_DIR}/{len(out)}", kind, facts.owners.get(src, (0, 0))))
    for f in files:
        out.append(StagedSource(f.path, f"{STAGE_DIR}/{len(out)}", FILE, None))
    return tuple(out)


def staged_path(path: str, staged: tuple[StagedSource, ...]) -> str:
    """Where bwrap finds host `path`: under the stage when a staged source holds it (the longest
    such source wins: a mount inside the workspace is its own tree), else `path` itself."""
    best: StagedSource | None = None
    for st in staged:
        if _under(path, (st.source,)) and (best is None or len(st.source) > len(best.source)):
            best = st
    if best is None:
        return path
    return best.staged + path[len(best.source):]


def unsearchable_error(path: str, agent_uid: int) -> LaunchError:
    return LaunchError(
        f"the workspace's parent directory {path} cannot be searched by the agent's host uid {agent_uid} "
        f"(firma runs as root and gives the agent an unprivileged uid): chmod o+x {path}, or move the "
        "workspace, or run firma as a normal user"
    )


def build(
    envelope: ExecutionEnvelope,
    facts: BwrapFacts,
    *,
    bwrap: str = "bwrap",
    info_fd: int | None = None,
    block_fd: int | None = None,
    seccomp_fd: int | None = None,
    protected_extra: tuple[str, ...] = (),
) -> BwrapPlan:
    kinds = facts.kinds
    prot = protection(envelope.cwd, protected_extra + facts.git_refs, kinds)
    if prot.symlinks:
        raise symlink_error(prot.symlinks[0])
    rt = envelope.runtime_dir
    if facts.caller_is_root:
        uid = gid = ROOT_CALLER_INSIDE_ID
        host_uid = host_gid = ROOT_CALLER_AGENT_ID
        if facts.unsearchable:
            raise unsearchable_error(facts.unsearchable[0], host_uid)
    else:
        uid, gid = facts.caller_uid, facts.caller_gid
        host_uid, host_gid = facts.caller_uid, facts.caller_gid
    files = [
        GeneratedFile(f"{rt}/resolv.conf", "/etc/resolv.conf", RESOLV_CONF),
        GeneratedFile(f"{rt}/hosts", "/etc/hosts", HOSTS),
    ]
    if envelope.identity_mode is IdentityMode.SANDBOX_USER:
        files += [
            GeneratedFile(f"{rt}/passwd", "/etc/passwd", passwd_text(uid, gid, envelope.home)),
            GeneratedFile(f"{rt}/group", "/etc/group", group_text(gid)),
        ]
    staged = stage_sources(envelope, facts, tuple(files)) if facts.caller_is_root else ()

    def src(path: str) -> str:
        return staged_path(path, staged)

    a: list[str] = [bwrap]
    a += ["--unshare-user", "--uid", str(uid), "--gid", str(gid), "--disable-userns"]
    a += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    a += ["--hostname", SANDBOX_HOSTNAME, "--die-with-parent", "--new-session"]
    a += ["--cap-drop", "ALL"]
    a += ["--clearenv"]
    for k, v in sorted(envelope.env.items()):
        a += ["--setenv", k, v]

    a += ["--ro-bind", "/", "/", "--proc", "/proc"]
    for p in PROC_READ_ONLY:
        a += ["--ro-bind-try" if p in _PROC_OPTIONAL else "--ro-bind", p, p]
    a += ["--dev", "/dev"]

    tmpfs: list[str] = []
    for p in SYSTEM_TMPFS:
        # /var/run is normally a symlink to /run, which is already covered.
        if kinds.get(p) == DIR:
            tmpfs.append(p)
    for maybe in (facts.xdg_runtime_dir, facts.state_root):
        if maybe and kinds.get(maybe, DIR) == DIR and not _under(maybe, tuple(tmpfs)):
            tmpfs.append(maybe)
    masked: list[str] = list(tmpfs)
    size = str(tmpfs_bytes(facts.mem_total, facts.memory_limit))
    for p in tmpfs:
        a += ["--size", size, "--tmpfs", p]

    if facts.caller_is_root:
        # Files the agent opens are still checked against outside uid 0: hide root's secrets.
        a += ["--size", size, "--tmpfs", "/root"]
        masked.append("/root")
        for p in ROOT_SECRETS:
            a += _mask(p, facts, masked)

    a += ["--ro-bind" if envelope.workspace_read_only else "--bind", src(envelope.cwd), envelope.cwd]
    for m in envelope.mounts:
        a += ["--ro-bind" if m.read_only else "--bind", src(m.source), m.target]
    for p in prot.pinned:  # onto themselves, so they cannot be renamed away (read-only in a read-only workspace)
        a += ["--ro-bind" if envelope.workspace_read_only else "--bind", src(p), p]
    for p in prot.read_only:
        a += ["--ro-bind", src(p), p]

    for rel in envelope.mask_home_paths:
        a += _mask(posixpath.join(envelope.home, rel), facts, masked)
    for p in envelope.mask_paths:
        a += _mask(p, facts, masked)

    for f in files:
        if f.target == "/etc/resolv.conf" and facts.resolv_conf_target:
            # The symlink target may be a host resolver stub: cover it too (ATTACKS #28).
            a += ["--ro-bind", src(f.path), facts.resolv_conf_target]
        a += ["--ro-bind", src(f.path), f.target]

    if seccomp_fd is not None:
        a += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        a += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        a += ["--block-fd", str(block_fd)]
    command = (envelope.executable, *envelope.args)
    a += ["--chdir", envelope.cwd, "--", *command]
    return BwrapPlan(
        argv=tuple(a),
        command=command,
        inside_uid=uid,
        inside_gid=gid,
        files=tuple(files),
        masked=tuple(masked),
        tmpfs=tuple(tmpfs),
        tmpfs_size=int(size),
        protection=prot,
        agent_host_uid=host_uid,
        agent_host_gid=host_gid,
        staged=staged,
    )


def options_blob(plan: BwrapPlan) -> bytes:
    """bwrap's options, NUL-separated, for `bwrap --args FD`.

    The options carry the launch environment (`--setenv`, API keys included); on the command
    line they would be readable by every local user in /proc/<pid>/cmdline."""
    options = plan.argv[1 : len(plan.argv) - len(plan.command) - 1]
    if any("\0" in o for o in options):
        raise ValueError("a bwrap option contains a NUL byte")
    return b"".join(o.encode() + b"\0" for o in options)


def exec_argv(plan: BwrapPlan, args_fd: int) -> tuple[str, ...]:
    """The command line actually executed: options come from args_fd, only the command is visible."""
    return (plan.argv[0], "--args", str(args_fd), "--", *plan.command)


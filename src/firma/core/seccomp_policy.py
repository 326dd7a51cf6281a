"""Managed seccomp policy (DESIGN §10): strict TOML parse and the rule set it compiles to.

Pure: text in, frozen data out. `firma.seccomp.store` turns the rules into BPF with libseccomp.

A policy denies *actions*; each action is a fixed set of syscalls answered with EPERM. The
always-on hardening rules are added to every filter, the built-in default included, because they
close kernel surfaces an agent could use to leave its namespaces or reach the user's terminal."""

from __future__ import annotations

import errno
import hashlib
import re

from ..errors import SeccompError
from .record import record

DEFAULT_POLICY_ID = "firma-default"
# Bump whenever HARDENING (or how rules compile) changes: it names the artifact directory, so an
# old artifact is never mistaken for the current one.
DEFAULT_POLICY_VERSION = "3"

ACTIONS: dict[str, tuple[str, ...]] = {
    "credential.write": (
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
        "setgroups", "setfsuid", "setfsgid",
    ),
    "system.execute": ("execve", "execveat"),
    "filesystem.delete": ("unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2"),
}
# Syscalls an exec-deny cannot take from the BPF artifact: bwrap applies `--seccomp` right before
# its own final execve, so they are enforced by the exec gate (firma.seccomp.exec_gate) instead.
EXEC_SYSCALLS = ACTIONS["system.execute"]

_KEYS = ("policy_id", "policy_version", "default_action", "deny_actions")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Comparison operators (names match libseccomp's).
EQ = "EQ"
MASKED_EQ = "MASKED_EQ"

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_PACKET = 17
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_U32 = 0xFFFFFFFF
S_ISUID = 0o4000
S_ISGID = 0o2000
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE: O_TMPFILE is this bit plus O_DIRECTORY
# Syscalls that set a mode, and which argument holds it: (syscall, mode arg, open-flags arg or None).
# An open-family call sets a mode only when it creates (O_CREAT, or O_TMPFILE).
MODE_SETTERS: tuple[tuple[str, int, int | None], ...] = (
    ("chmod", 1, None), ("fchmod", 1, None), ("fchmodat", 2, None), ("fchmodat2", 2, None),
    ("creat", 1, None), ("mkdir", 1, None), ("mkdirat", 2, None), ("mknod", 1, None),
    ("mknodat", 2, None), ("open", 2, 1), ("openat", 3, 2),
)


@record
class ArgCmp:
    """One argument comparison: `(arg[index] & mask) == value` for MASKED_EQ, `arg == value` for EQ."""

    index: int
    op: str
    value: int
    mask: int = 0


@record
class Rule:
    syscall: str
    errno: int = errno.EPERM
    # All comparisons must hold (AND); an empty tuple matches every call.
    args: tuple[ArgCmp, ...] = ()
    why: str = ""


def _eperm(names: tuple[str, ...], why: str) -> tuple[Rule, ...]:
    return tuple(Rule(n, why=why) for n in names)


def _u32_eq(syscall: str, index: int, value: int, why: str) -> Rule:
    # The kernel reads these arguments as 32-bit ints: compare only the low half, so a caller
    # cannot slip past with garbage in the upper 32 bits (the flatpak TIOCSTI bypass).
    return Rule(syscall, args=(ArgCmp(index, MASKED_EQ, value, _U32),), why=why)


def _no_set_id_bits() -> tuple[Rule, ...]:
    """EPERM for every call that would give a file setuid or setgid bits: a file the agent marks
    setuid stays on the host, and for a root caller it would be setuid-root for every local user."""
    why = "no setuid/setgid files: they outlive the run on the host"
    rules: list[Rule] = []
    for syscall, mode_arg, flags_arg in MODE_SETTERS:
        for bit in (S_ISUID, S_ISGID):
            mode = ArgCmp(mode_arg, MASKED_EQ, bit, bit)
            if flags_arg is None:
                rules.append(Rule(syscall, args=(mode,), why=why))
                continue
            for creating in (O_CREAT, O_TMPFILE_BIT):
                rules.append(Rule(syscall, args=(ArgCmp(flags_arg, MASKED_EQ, creating, creating), mode), why=why))
    return tuple(rules)


_NS_FLAGS = (
    CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
    CLONE_NEWNET,
)

HARDENING: tuple[Rule, ...] = (
    *_eperm(("io_uring_setup", "io_uring_enter", "io_uring_register"),
            "io_uring ops bypass per-syscall filtering"),
    _u32_eq("ioctl", 1, TIOCSTI, "TIOCSTI injects keystrokes into the user's terminal"),
    _u32_eq("ioctl", 1, TIOCLINUX, "TIOCLINUX reads/pastes the virtual console"),
    *_eperm(("ptrace", "process_vm_writev", "process_vm_readv"),
            "no tampering with other processes"),
    *_eperm(("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module"),
            "no kernel code loading"),
    *_eperm(("mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
             "fspick", "move_mount", "open_tree", "mount_setattr"),
            "no mount-table changes"),
    *_eperm(("unshare", "setns"), "no new or foreign namespaces"),
    # clone() with a namespace flag is unshare() by another name.
    *(Rule("clone", args=(ArgCmp(0, MASKED_EQ, f, f),), why="clone into a new namespace")
      for f in _NS_FLAGS),
    # clone3 passes its flags in memory, out of BPF's reach: ENOSYS makes libc fall back to clone.
    Rule("clone3", errno=errno.ENOSYS, why="clone3 flags cannot be inspected"),
    _u32_eq("socket", 0, AF_PACKET, "raw link-layer sockets"),
    # Beyond the list in DESIGN §10, the usual container-runtime denials of unnamespaced kernel surfaces
    # that exploits lean on and agents do not need.
    *_eperm(("keyctl", "add_key", "request_key"), "kernel keyrings are not namespaced"),
    *_eperm(("bpf", "perf_event_open", "userfaultfd"), "kernel attack surface"),
    *_no_set_id_bits(),
    # openat2 passes its flags and mode in memory, out of BPF's reach: ENOSYS makes libc use openat.
    Rule("openat2", errno=errno.ENOSYS, why="openat2 mode cannot be inspected"),
)


@record
class SeccompPolicy:
    policy_id: str
    policy_version: str
    deny_actions: tuple[str, ...]  # sorted, unique
    source_sha256: str  # of the policy text as read (built-in: of its canonical text)
    source_path: str | None = None  # None for the built-in default

    @property
    def denied_syscalls(self) -> tuple[str, ...]:
        """Syscalls the policy's actions deny (hardening excluded), in action order."""
        out: list[str] = []
        for action in self.deny_actions:
            out.extend(s for s in ACTIONS[action] if s not in out)
        return tuple(out)

    @property
    def exec_gate(self) -> bool:
        """True when execve must be denied after the initial command starts."""
        return "system.execute" in self.deny_actions

    def rules(self) -> tuple[Rule, ...]:
        """Rules for the BPF artifact: policy denies (minus the exec gate's) plus hardening."""
        own = tuple(
            Rule(s, why=f"policy action {a}")
            for a in self.deny_actions
            for s in ACTIONS[a]
            if s not in EXEC_SYSCALLS
        )
        return own + HARDENING


def _canonical_text(policy_id: str, version: str, actions: tuple[str, ...]) -> str:
    acts = ", ".join(f'"{a}"' for a in actions)
    return (
        f'policy_id = "{policy_id}"\npolicy_version = "{version}"\n'
        f'default_action = "allow"\ndeny_actions = [{acts}]\n'
    )


def default_policy() -> SeccompPolicy:
    """The built-in policy: hardening only."""
    text = _canonical_text(DEFAULT_POLICY_ID, DEFAULT_POLICY_VERSION, ())
    return SeccompPolicy(
        DEFAULT_POLICY_ID, DEFAULT_POLICY_VERSION, (), hashlib.sha256(text.encode()).hexdigest()
    )


def parse_policy(data: bytes, source: str) -> SeccompPolicy:
    """Parse a policy file strictly; every error names the file and what to change."""
    import tomllib  # noqa: PLC0415 - only with a policy file: the built-in default needs no TOML parser

    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SeccompError(f"seccomp policy {source}: invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise SeccompError(
            f"seccomp policy {source}: unknown key '{unknown[0]}'; allowed keys: {', '.join(_KEYS)}"
        )
    for key in _KEYS:
        if key not in doc:
            raise SeccompError(f"seccomp policy {source}: missing required key '{key}'")

    def ident(key: str) -> str:
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise SeccompError(f"seccomp policy {source}: '{key}' must be a string")
        text = str(value)
        if not _SAFE.match(text) or text in (".", ".."):
            raise SeccompError(
                f"seccomp policy {source}: '{key}' = {value!r} must match [A-Za-z0-9][A-Za-z0-9._-]*"
                " (at most 64 characters)"
            )
        return text

    policy_id = ident("policy_id")
    version = ident("policy_version")
    if policy_id == DEFAULT_POLICY_ID:
        raise SeccompError(
            f"seccomp policy {source}: policy_id '{DEFAULT_POLICY_ID}' is reserved; choose another"
        )
    if doc["default_action"] != "allow":
        raise SeccompError(
            f"seccomp policy {source}: default_action must be \"allow\" (got {doc['default_action']!r})"
        )
    acts = doc["deny_actions"]
    if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
        raise SeccompError(f"seccomp policy {source}: 'deny_actions' must be a list of strings")
    for a in acts:
        if a not in ACTIONS:
            raise SeccompError(
                f"seccomp policy {source}: unknown action '{a}'; known actions: "
                + ", ".join(sorted(ACTIONS))
            )
    dups = sorted({a for a in acts if acts.count(a) > 1})
    if dups:
        raise SeccompError(f"seccomp policy {source}: action '{dups[0]}' listed twice")
    return SeccompPolicy(
        policy_id, version, tuple(sorted(acts)), hashlib.sha256(data).hexdigest(), source
    )

"""Managed seccomp artifacts (DESIGN §10): compile with libseccomp, store, verify before every use.

Layout: `<root>/<policy_id>/<policy_version>/<arch>/policy.bpf` + `policy.metadata.json`, where
`<root>` is the project's `seccomp_policy.artifact_dir` or `<state root>/seccomp-artifacts`.

Every launch compiles the policy in memory (libseccomp output is deterministic) and requires the
stored artifact to be byte-identical, so a tampered BPF or metadata file, or a stale artifact for a
changed source, refuses the launch instead of being trusted or silently replaced. `open_verified`
re-checks the file it hands to bwrap through the descriptor it returns (no symlink, owner, mode,
sha256), so nothing can be swapped between the check and the use."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys

from .. import privfs
from ..core.model import SeccompArtifactRef, SeccompPolicyRef
from ..core.record import record
from ..core.seccomp_policy import (
    EQ,
    EXEC_SYSCALLS,
    HARDENING,
    MASKED_EQ,
    SeccompPolicy,
    default_policy,
    parse_policy,
)
from ..errors import SeccompError
from ..privfs import PrivatePathError

BPF_NAME = "policy.bpf"
METADATA_NAME = "policy.metadata.json"
METADATA_FORMAT = 1
_MAX_POLICY_BYTES = 64 * 1024
_EXEC_GATE_SCRIPT = os.path.join(os.path.dirname(__file__), "exec_gate.py")  # not pathlib: launch latency
# The exec gate runs inside the sandbox, where firma's own venv may be hidden (/root is masked
# when the caller is root): prefer a system interpreter; the gate needs only the stdlib.
_GATE_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")

# platform.machine() → libseccomp arch name (pyseccomp.Arch attribute).
ARCHES = {
    "x86_64": "X86_64", "amd64": "X86_64", "aarch64": "AARCH64", "arm64": "AARCH64",
    "riscv64": "RISCV64",
}  # asm-generic ioctl numbers, clone flags in arg 0, little-endian (the exec gate's BPF needs it)


# The sonames pyseccomp needs on glibc Linux. pyseccomp finds them with ctypes.util.find_library
# at import, which runs `ldconfig -p` once per library, and importing ctypes.util pulls in
# tempfile, shutil and re: ~8 ms of every launch. A soname that dlopen accepts directly is the
# library the loader would pick; anything else goes to the real lookup.
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp():
    import ctypes  # noqa: PLC0415 - only to load pyseccomp, on Linux, when a filter is compiled (launch latency)
    import types  # noqa: PLC0415 - only to load pyseccomp, on Linux, when a filter is compiled (launch latency)

    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        import ctypes.util as real  # noqa: PLC0415 - only for a library dlopen did not find

        return real.find_library(name)

    # pyseccomp reads ctypes.util.find_library only while it is imported: for that moment it
    # sees this stand-in (unless the real module is loaded already; then it is patched).
    real_util = sys.modules.get("ctypes.util")
    stand_in = real_util or types.ModuleType("ctypes.util")
    saved = getattr(stand_in, "find_library", None)
    stand_in.find_library = find_library
    if real_util is None:
        sys.modules["ctypes.util"] = stand_in
        ctypes.util = stand_in
    try:
        import pyseccomp  # noqa: PLC0415 - only to load pyseccomp, on Linux, when a filter is compiled (launch latency)
    finally:
        if real_util is None:
            if sys.modules.get("ctypes.util") is stand_in:
                del sys.modules["ctypes.util"]
            if getattr(ctypes, "util", None) is stand_in:
                del ctypes.util
        else:
            real_util.find_library = saved
    return pyseccomp


def _pyseccomp():
    try:
        pyseccomp = _import_pyseccomp()
    except (ImportError, OSError) as exc:  # libseccomp.so missing or unloadable
        raise SeccompError(
            f"seccomp: libseccomp is not available ({exc}); install it with: apt-get install "
            "libseccomp2"
        ) from None
    return pyseccomp


@record
class SeccompArtifact(SeccompArtifactRef):
    """This launch's compilation: what a backend opens and verifies (the SeccompArtifactRef it is,
    and which the envelope carries), plus what the launch itself needs."""

    syscalls: tuple[str, ...]  # every syscall the filter and exec gate restrict
    # Argv prefix for the agent command when the policy denies system.execute (see firma.seccomp.exec_gate).
    command_prefix: tuple[str, ...] = ()

    @property
    def exec_gate(self) -> bool:
        return bool(self.command_prefix)

    def proof_detail(self) -> str:
        gate = "; execve gated after the initial command" if self.exec_gate else ""
        return (f"seccomp artifact {self.policy_id}/{self.policy_version}/{self.arch} "
                f"sha256={self.sha256}{gate}")


def _arch_token(machine: str) -> tuple[str, int]:
    pyseccomp = _pyseccomp()

    name = ARCHES.get(machine.lower())
    if name is None:
        raise SeccompError(
            f"seccomp: unsupported machine architecture '{machine}'; supported: "
            + ", ".join(sorted(ARCHES))
        )
    return name.lower(), getattr(pyseccomp.Arch, name)


def _exec_gate_prefix(machine: str, python3: str | None = None) -> tuple[str, ...]:
    """`python3 -I -S -c <gate source> ARCH NR_EXECVE NR_EXECVEAT --` (see firma.seccomp.exec_gate)."""
    pyseccomp = _pyseccomp()

    _, arch = _arch_token(machine)
    python = python3 or next((p for p in _GATE_PYTHONS if os.access(p, os.X_OK)),
                             os.path.realpath(sys.executable))
    try:
        with open(_EXEC_GATE_SCRIPT) as f:
            source = f.read()
    except OSError as exc:
        raise SeccompError(f"seccomp: exec gate {_EXEC_GATE_SCRIPT} unreadable: {exc}") from None
    nrs = [pyseccomp.resolve_syscall(arch, n) for n in EXEC_SYSCALLS]
    if min(nrs) < 0:
        raise SeccompError(f"seccomp: execve/execveat unknown on {machine}; cannot gate exec")
    return (python, "-I", "-S", "-c", source, hex(arch), *(str(n) for n in nrs), "--")


def compile_bpf(policy: SeccompPolicy, machine: str) -> bytes:
    """The policy's BPF program (sock_fprog bytes, what `bwrap --seccomp` reads) for `machine`."""
    pyseccomp = _pyseccomp()
    _, arch = _arch_token(machine)
    ops = {EQ: pyseccomp.EQ, MASKED_EQ: pyseccomp.MASKED_EQ}
    try:
        filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        # Exactly one architecture: every other ABI (i386 via int 0x80, x32, …) kills the process,
        # so a syscall number cannot be reinterpreted under a table the rules do not cover.
        if arch != pyseccomp.system_arch():
            filt.add_arch(arch)
            filt.remove_arch(pyseccomp.Arch.NATIVE)
        filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        for rule in policy.rules():
            args = []
            for a in rule.args:
                if a.op == MASKED_EQ:
                    args.append(pyseccomp.Arg(a.index, ops[a.op], a.mask, a.value))
                else:
                    args.append(pyseccomp.Arg(a.index, ops[a.op], a.value))
            try:
                filt.add_rule(pyseccomp.ERRNO(rule.errno), rule.syscall, *args)
            except OSError as exc:
                raise SeccompError(
                    f"seccomp: compiling policy {policy.policy_id}/{policy.policy_version} failed "
                    f"at syscall '{rule.syscall}': {exc.strerror}"
                ) from None
        with os.fdopen(os.memfd_create("firma-bpf", os.MFD_CLOEXEC), "w+b") as out:
            filt.export_bpf(out)
            out.seek(0)
            data = out.read()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SeccompError(
            f"seccomp: compiling policy {policy.policy_id}/{policy.policy_version} failed: {exc}"
        ) from None
    if not data or len(data) % 8:
        raise SeccompError(
            f"seccomp: compiling policy {policy.policy_id} produced an invalid BPF program "
            f"({len(data)} bytes)"
        )
    return data


def _metadata(policy: SeccompPolicy, arch: str, bpf_sha: str) -> bytes:
    syscalls = sorted({r.syscall for r in policy.rules()} | set(policy.denied_syscalls))
    doc = {
        "format": METADATA_FORMAT,
        "policy_id": policy.policy_id,
        "policy_version": policy.policy_version,
        "arch": arch,
        "bpf_sha256": bpf_sha,
        "source_sha256": policy.source_sha256,
        "default_action": "allow",
        "deny_actions": list(policy.deny_actions),
        "bad_arch_action": "kill_process",
        "syscalls": syscalls,
        "exec_gate": list(EXEC_SYSCALLS) if policy.exec_gate else [],
        "hardening": sorted({r.syscall for r in HARDENING}),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def load_policy(ref: SeccompPolicyRef | None) -> SeccompPolicy:
    if ref is None:
        return default_policy()
    path = ref.source_policy_path
    if not os.path.isabs(path):
        raise SeccompError(f"seccomp policy path must be absolute: {path}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SeccompError(
            f"seccomp policy {path} cannot be read: {exc.strerror}; fix [run].seccomp_policy"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SeccompError(f"seccomp policy {path} is not a regular file")
        data = os.read(fd, _MAX_POLICY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_POLICY_BYTES:
        raise SeccompError(f"seccomp policy {path} is larger than {_MAX_POLICY_BYTES} bytes")
    return parse_policy(data, path)


def _check_node(st: os.stat_result, where: str, want_dir: bool) -> None:
    kind = "directory" if want_dir else "file"
    if stat.S_ISLNK(st.st_mode):
        raise SeccompError(f"seccomp artifact {where} is a symlink; remove it to rebuild")
    if (want_dir and not stat.S_ISDIR(st.st_mode)) or (not want_dir and not stat.S_ISREG(st.st_mode)):
        raise SeccompError(f"seccomp artifact {where} is not a {kind}; remove it to rebuild")
    if st.st_uid != os.geteuid():
        raise SeccompError(
            f"seccomp artifact {where} is owned by uid {st.st_uid}, not {os.geteuid()}; "
            "remove it to rebuild"
        )
    if st.st_mode & 0o022:
        raise SeccompError(
            f"seccomp artifact {where} is group/other-writable (mode {stat.S_IMODE(st.st_mode):o}); "
            "remove it to rebuild"
        )


def _open_dir_chain(root: str, parts: tuple[str, ...], create: bool) -> int:
    """Open `root/parts…` one component at a time with O_NOFOLLOW, checking each directory."""
    if os.path.realpath(root) != os.path.normpath(root):
        raise SeccompError(
            f"seccomp artifact root {root} goes through a symlink ({os.path.realpath(root)}); "
            "configure a path without symlinks"
        )
    try:
        if create:
            privfs.ensure_dir(root)
        else:
            privfs.check_ancestors(root, sticky_parent=True)
    except PrivatePathError as exc:
        raise SeccompError(f"seccomp artifact root: {exc}") from None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags)
    except OSError as exc:
        raise SeccompError(f"seccomp artifact root {root} cannot be opened: {exc.strerror}") from None
    where = root
    try:
        _check_node(os.fstat(fd), where, True)
        for name in parts:
            where = f"{where}/{name}"
            if create:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                st = _lstat_at(fd, name)
                if st is not None:
                    _check_node(st, where, True)
                raise SeccompError(
                    f"seccomp artifact directory {where} cannot be opened: {exc.strerror}"
                ) from None
            os.close(fd)
            fd = nfd
            _check_node(os.fstat(fd), where, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _open_file(dir_fd: int, name: str, where: str) -> int:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        st = _lstat_at(dir_fd, name)
        if st is not None:
            _check_node(st, where, False)
        raise SeccompError(f"seccomp artifact {where} cannot be opened: {exc.strerror}") from None
    try:
        _check_node(os.fstat(fd), where, False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_private(dir_fd: int, name: str, data: bytes) -> None:
    """Create `name` atomically (temp + rename in the same directory), mode 0600."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # Never replace an existing artifact: a concurrent launch may have written it first,
        # and what is there gets verified, not overwritten.
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # No hard links on this filesystem: a rename can only race an identical writer.
        if _lstat_at(dir_fd, name) is None:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
    finally:
        if _lstat_at(dir_fd, tmp) is not None:
            os.unlink(tmp, dir_fd=dir_fd)


def _parts(artifact: SeccompArtifactRef) -> tuple[str, ...]:
    return (artifact.policy_id, artifact.policy_version, artifact.arch)


def plan_artifact(
    policy: SeccompPolicyRef | None, state_root: str, machine: str, python3: str | None = None
) -> tuple[SeccompArtifact, bytes]:
    """Compile in memory and describe where the artifact lives; writes nothing."""
    pol = load_policy(policy)
    arch, _ = _arch_token(machine)
    if policy is not None and policy.artifact_dir:
        root = policy.artifact_dir
    else:
        root = os.path.join(state_root, "seccomp-artifacts")
    if not os.path.isabs(root):
        raise SeccompError(f"seccomp artifact directory must be absolute: {root}")
    root = os.path.normpath(root)
    bpf = compile_bpf(pol, machine)
    sha = hashlib.sha256(bpf).hexdigest()
    meta = _metadata(pol, arch, sha)
    prefix = _exec_gate_prefix(machine, python3) if pol.exec_gate else ()
    directory = os.path.join(root, pol.policy_id, pol.policy_version, arch)
    art = SeccompArtifact(
        path=os.path.join(directory, BPF_NAME),
        metadata_path=os.path.join(directory, METADATA_NAME),
        sha256=sha, policy_id=pol.policy_id, policy_version=pol.policy_version, arch=arch,
        root=root, metadata=meta, syscalls=tuple(json.loads(meta)["syscalls"]),
        command_prefix=prefix,
    )
    return art, bpf


def prepare_filter(
    policy: SeccompPolicyRef | None, state_root: str, machine: str, python3: str | None = None
) -> SeccompArtifact:
    """Compile the policy (built-in default when None), store it if absent, verify it, describe it.

    The hardening rules are part of every filter. Raises SeccompError with a one-line reason."""
    art, bpf = plan_artifact(policy, state_root, machine, python3)
    directory = os.path.dirname(art.path)
    dfd = _open_dir_chain(art.root, _parts(art), create=True)
    try:
        for name, data in ((BPF_NAME, bpf), (METADATA_NAME, art.metadata)):
            if _lstat_at(dfd, name) is None:
                _write_private(dfd, name, data)
    except OSError as exc:
        raise SeccompError(f"seccomp artifact {directory} cannot be written: {exc.strerror}") from None
    finally:
        os.close(dfd)
    os.close(open_verified(art))
    return art


def open_verified(artifact: SeccompArtifactRef) -> int:
    """Verify the stored artifact and return a read-only descriptor of the BPF at offset 0.
    `artifact` is this launch's compilation or the reference to it an envelope carries.

    Checks, through descriptors opened with O_NOFOLLOW from the artifact root down: no symlink,
    owned by this user, no group/other write, regular files; the BPF's sha256 equals this launch's
    compilation and the metadata file is byte-identical to the expected one. The descriptor is
    close-on-exec: pass it to bwrap with `pass_fds`. Raises SeccompError on any mismatch."""
    dfd = _open_dir_chain(artifact.root, _parts(artifact), create=False)
    try:
        mfd = _open_file(dfd, METADATA_NAME, artifact.metadata_path)
        try:
            meta = _read_all(mfd)
        finally:
            os.close(mfd)
        if meta != artifact.metadata:
            raise SeccompError(
                f"seccomp artifact metadata {artifact.metadata_path} does not match policy "
                f"{artifact.policy_id}/{artifact.policy_version} (tampered, or the source changed "
                "without a policy_version bump); bump policy_version or remove the directory"
            )
        fd = _open_file(dfd, BPF_NAME, artifact.path)
    finally:
        os.close(dfd)
    try:
        got = hashlib.sha256(_read_all(fd)).hexdigest()
        if got != artifact.sha256:
            raise SeccompError(
                f"seccomp artifact {artifact.path} sha256 {got} does not match the compiled policy "
                f"({artifact.sha256}); remove the directory to rebuild"
            )
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except BaseException:
        os.close(fd)
        raise

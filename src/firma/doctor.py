"""`firma doctor`: can this host give a run the confinement it promises?

Two halves. `gather()` does the (read-only) looking: config file, state directory, libseccomp, a
bwrap smoke sandbox, the sidecar endpoint. `evaluate()` is pure: a `Host` plus those observations
in, a list of checks out, so tests can describe any host. The bwrap verdict comes from
`preflight.bwrap_preflight`, the function `firma run` calls, so the two cannot disagree."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess

from .core.record import asdict, record
from .errors import FirmaError
from .core.hostfacts import Host
from .core import settings as env_names
from .core.settings import is_truthy
from .backends.preflight import bwrap_preflight

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_BWRAP = (0, 8, 0)  # --disable-userns first appeared in bubblewrap 0.8.0


@record
class DoctorCheck:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    remediation: str = ""  # one line; empty when there is nothing to do


@record
class PathFacts:
    """lstat of a path, or exists=False."""

    exists: bool
    is_symlink: bool = False
    is_dir: bool = False
    mode: int = 0
    uid: int = 0


@record
class Observations:
    config_path: str | None = None
    config_error: str | None = None
    state_root: str = ""
    state_root_facts: PathFacts = PathFacts(False)
    kernel_seccomp: bool = False  # "Seccomp:" present in /proc/self/status
    seccomp_error: str | None = None  # libseccomp missing, compile or policy failure
    seccomp_detail: str = ""
    smoke: tuple[bool, str] | None = None  # bwrap smoke sandbox (None: not attempted)
    apparmor_restrict_userns: str | None = None
    sidecar_endpoint: str | None = None
    sidecar_error: str | None = None  # None = answered (when an endpoint is configured)
    vz_error: str | None = None
    transparent: tuple[bool, str] | None = None  # local default routes accepted (None: not tried)


# ---------------------------------------------------------------------------------------------
# Pure evaluation


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _os_check(host: Host) -> DoctorCheck:
    desc = f"{host.system} {host.machine} (kernel {host.kernel_osrelease or 'unknown'})"
    if host.is_wsl:
        return DoctorCheck("os", FAIL, f"WSL detected: {desc}; network namespaces are not a "
                           "reliable boundary there", "use a native Linux host (or macOS)")
    if host.is_linux or host.is_macos:
        return DoctorCheck("os", OK, desc)
    return DoctorCheck("os", FAIL, f"unsupported host {desc}",
                       "run on Linux (bwrap) or macOS (vz), or use --backend runner")


def _linux_checks(host: Host, obs: Observations) -> list[DoctorCheck]:
    out = []
    version = _version_tuple(host.bwrap_version)
    if "bwrap" in host.refused_binaries:
        out.append(DoctorCheck("bubblewrap", FAIL, host.refused_binaries["bwrap"],
                               "use a root-owned bwrap (apt-get install bubblewrap) or fix [host].bwrap"))
    elif host.bwrap_path is None:
        out.append(DoctorCheck("bubblewrap", FAIL, "bwrap not found in the system directories",
                               "install it with: apt-get install bubblewrap (or set [host].bwrap)"))
    elif host.bwrap_version is None:
        out.append(DoctorCheck("bubblewrap", FAIL, f"{host.bwrap_path} --version failed",
                               "reinstall bubblewrap: apt-get install --reinstall bubblewrap"))
    elif version is not None and version < MIN_BWRAP:
        need = ".".join(map(str, MIN_BWRAP))
        out.append(DoctorCheck("bubblewrap", FAIL, f"{host.bwrap_version} at {host.bwrap_path} "
                               f"lacks --disable-userns (needs >= {need}); firma run would fail "
                               "at launch", f"upgrade bubblewrap to {need} or later"))
    else:
        out.append(DoctorCheck("bubblewrap", OK, f"{host.bwrap_version} at {host.bwrap_path}"))

    knobs = (f"kernel.unprivileged_userns_clone={host.unprivileged_userns_clone or 'n/a'}, "
             f"user.max_user_namespaces={host.max_user_namespaces or 'n/a'}")
    if host.unprivileged_userns_clone == "0":
        out.append(DoctorCheck("user_namespaces", FAIL, f"restricted: {knobs}",
                               "sysctl -w kernel.unprivileged_userns_clone=1"))
    elif host.max_user_namespaces == "0":
        out.append(DoctorCheck("user_namespaces", FAIL, f"restricted: {knobs}",
                               "sysctl -w user.max_user_namespaces=15000"))
    elif obs.apparmor_restrict_userns == "1" and not host.is_root:
        out.append(DoctorCheck("user_namespaces", WARN, f"{knobs}; AppArmor restricts "
                               "unprivileged user namespaces "
                               "(kernel.apparmor_restrict_unprivileged_userns=1)",
                               "allow bwrap with an AppArmor profile, or sysctl -w "
                               "kernel.apparmor_restrict_unprivileged_userns=0"))
    else:
        out.append(DoctorCheck("user_namespaces", OK, f"available: {knobs}"))

    # The verdict `firma run` would reach, from the very same function.
    try:
        bwrap_preflight(host)
    except FirmaError as exc:
        out.append(DoctorCheck("bwrap_backend", FAIL, f"firma run would refuse: {exc}",
                               _fix_from_message(str(exc))))
    else:
        if obs.smoke is None:
            out.append(DoctorCheck("bwrap_backend", WARN, "preflight passed; the test sandbox "
                                   "was skipped", "run firma doctor to start a test sandbox"))
        elif obs.smoke[0]:
            out.append(DoctorCheck("bwrap_backend", OK, f"preflight passed; {obs.smoke[1]}"))
        else:
            out.append(DoctorCheck("bwrap_backend", FAIL, "preflight passed but a test sandbox "
                                   f"failed, so firma run would fail at launch: {obs.smoke[1]}",
                                   "check user-namespace/AppArmor/container restrictions on "
                                   "this host (see the user_namespaces check)"))

    if not obs.kernel_seccomp:
        out.append(DoctorCheck("seccomp", FAIL, "kernel has no seccomp filter support",
                               "use a kernel built with CONFIG_SECCOMP_FILTER"))
    elif obs.seccomp_error:
        out.append(DoctorCheck("seccomp", FAIL, obs.seccomp_error, _fix_from_message(
            obs.seccomp_error, "fix the seccomp policy or artifacts named above")))
    else:
        out.append(DoctorCheck("seccomp", OK, obs.seccomp_detail))
    out.append(_limits_check(host))
    if obs.transparent is not None:
        ok, detail = obs.transparent
        out.append(DoctorCheck("transparent_egress", OK if ok else FAIL, detail,
                               "" if ok else "firma run plants these routes in every sandbox; a kernel without "
                               "them cannot run firma's bwrap backend (use a newer kernel)"))
    return out


def _limits_check(host: Host) -> DoctorCheck:
    """Which mechanism would carry each resource limit of a run here (DESIGN §5.3), from the same
    planner `firma run` uses, with the default request."""
    from .core import limits

    plan = limits.plan_limits(limits.request({}, {}, host.mem_total), host.cgroups, host.rlimits)
    cg = host.cgroups
    controllers = ", ".join(f"{c} ({d})" for c, d in cg.parents.items())
    where = f"cgroup {cg.version}: {controllers}" if cg.version else "no cgroup firma may use"
    entries = "; ".join(f"{e.name} {e.value}: {e.mechanism}" for e in plan.entries if e.mechanism != "none")
    # pids always hold (RLIMIT_NPROC in the sandbox's user namespace); memory and cpus need a cgroup
    missing = [c for c in ("memory", "cpu") if not cg.has(c)]
    if not missing:
        return DoctorCheck("limits", OK, f"{where}; defaults: {entries}")
    why = f"; {cg.why_not}" if cg.why_not else ""
    return DoctorCheck(
        "limits", WARN,
        f"{where}{why}; defaults: {entries}; an explicit --{' / --'.join('cpus' if c == 'cpu' else c for c in missing)} "
        "would be refused (or run unenforced with --limits best-effort)",
        "run firma as root, or inside a delegated scope: systemd-run --user --scope -p Delegate=yes firma run ...",
    )


def _fix_from_message(msg: str, default: str = "see the detail") -> str:
    """Our one-line errors carry their fix after `; ` (e.g. `…; enable them with: sysctl …`)."""
    return msg.rsplit("; ", 1)[1] if "; " in msg else default


def _macos_checks(host: Host, obs: Observations) -> list[DoctorCheck]:
    out = []
    if host.sandbox_exec_path:
        out.append(DoctorCheck("sandbox_exec", OK, host.sandbox_exec_path))
    else:
        out.append(DoctorCheck("sandbox_exec", FAIL, "sandbox-exec is not installed or not "
                               "executable", "restore /usr/bin/sandbox-exec (part of macOS)"))
    if not is_truthy(host.environ.get(env_names.VZ_GUEST)):
        out.append(DoctorCheck("vz_guest_inputs", OK, "guest mode not selected "
                               "(FIRMA_RUN_VZ_GUEST unset)"))
    elif obs.vz_error:
        out.append(DoctorCheck("vz_guest_inputs", FAIL, obs.vz_error,
                               "set FIRMA_RUN_VZ_GUEST_RUNNER/KERNEL/INITRD/ROOTFS to absolute "
                               "paths of existing files (runner executable)"))
    else:
        out.append(DoctorCheck("vz_guest_inputs", OK, "runner, kernel, initrd and rootfs valid"))
    return out


def _state_check(host: Host, obs: Observations) -> DoctorCheck:
    f, root = obs.state_root_facts, obs.state_root
    if not f.exists:
        return DoctorCheck("state_dir", OK, f"{root} (will be created with mode 0700)")
    if f.is_symlink:
        return DoctorCheck("state_dir", FAIL, f"{root} is a symlink",
                           f"remove {root} or set FIRMA_STATE_DIR to a private directory")
    if not f.is_dir:
        return DoctorCheck("state_dir", FAIL, f"{root} is not a directory",
                           f"remove {root} or set FIRMA_STATE_DIR elsewhere")
    if f.uid != host.uid:
        return DoctorCheck("state_dir", FAIL, f"{root} is owned by uid {f.uid}, not {host.uid}",
                           f"remove {root} or set FIRMA_STATE_DIR to a directory you own")
    if f.mode & 0o077:
        return DoctorCheck("state_dir", FAIL, f"{root} has mode {f.mode:04o}, expected 0700",
                           f"chmod 700 {root}")
    return DoctorCheck("state_dir", OK, f"{root} (mode 0700)")


def _config_check(obs: Observations) -> DoctorCheck:
    if obs.config_error:
        return DoctorCheck("config", FAIL, obs.config_error,
                           f"fix {obs.config_path or 'the config file'} (see the detail)")
    if obs.config_path is None:
        return DoctorCheck("config", OK, "no firma.toml found; built-in defaults apply")
    return DoctorCheck("config", OK, f"{obs.config_path} parsed")


def _sidecar_check(obs: Observations) -> DoctorCheck:
    ep = obs.sidecar_endpoint
    if ep is None or ep == "local":
        return DoctorCheck("sidecar", OK, "none configured; firma run starts an embedded sidecar")
    if obs.sidecar_error:
        return DoctorCheck("sidecar", FAIL, f"{ep} is not answering: {obs.sidecar_error}",
                           f"start it (firma sidecar --listen {ep}) or fix sidecar_endpoint")
    return DoctorCheck("sidecar", OK, f"{ep} answers")


def evaluate(host: Host, obs: Observations) -> list[DoctorCheck]:
    checks = [_os_check(host)]
    if host.is_linux:
        checks += _linux_checks(host, obs)
    if host.is_macos:
        checks += _macos_checks(host, obs)
    checks += [_state_check(host, obs), _config_check(obs), _sidecar_check(obs)]
    return checks


def report_json(checks: list[DoctorCheck]) -> str:
    return json.dumps({"checks": [asdict(c) for c in checks],
                       "ok": not any(c.status == FAIL for c in checks)}, indent=2)


def report_text(checks: list[DoctorCheck]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.status != OK and c.remediation:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.remediation}")
    return "\n".join(lines)


def exit_code(checks: list[DoctorCheck]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


# ---------------------------------------------------------------------------------------------
# Gathering (read-only I/O)


def _config(host: Host, cli_path: str | None, cwd: str):
    """Find, read and trust-filter the config files exactly as `firma run` does (configfiles):
    (highest-precedence path, that file as honoured, error)."""
    from .configfiles import load

    try:
        cfgs = load(cli_path, host.environ, cwd)
    except FirmaError as exc:
        return None, None, str(exc)
    if not cfgs.files:
        refused = next((s for s in cfgs.sources if s.state.startswith("not read")), None)
        return (refused.path, None, f"{refused.path} {refused.state}") if refused else (None, None, None)
    return cfgs.paths[-1], cfgs.files[-1][0], None


def _seccomp_refs(cfg) -> list:
    """Every seccomp policy the config can select (run, defaults, each profile); None = built-in."""
    refs: list = []
    if cfg is not None:
        for layer in (cfg.run, cfg.defaults, *cfg.profiles.values()):
            ref = layer.get("seccomp_policy")
            if ref is not None and ref not in refs:
                refs.append(ref)
    return refs or [None]


def _facts(path: str) -> PathFacts:
    try:
        st = os.lstat(path)
    except OSError:
        return PathFacts(False)
    return PathFacts(True, stat.S_ISLNK(st.st_mode), stat.S_ISDIR(st.st_mode),
                     stat.S_IMODE(st.st_mode), st.st_uid)


def _kernel_seccomp() -> bool:
    try:
        with open("/proc/self/status") as fh:
            return any(line.startswith("Seccomp:") for line in fh)
    except OSError:
        return False


def _seccomp(host: Host, ref, state_root: str) -> tuple[str | None, str, bytes | None]:
    """Compile (in memory) what run would load; verify the stored artifact when there is one."""
    from .errors import SeccompError
    from .seccomp.store import open_verified, plan_artifact

    try:
        art, bpf = plan_artifact(ref, state_root, host.machine)
    except SeccompError as exc:
        return str(exc), "", None
    detail = (f"libseccomp compiles policy {art.policy_id}/{art.policy_version}/{art.arch} "
              f"({len(bpf) // 8} BPF instructions)")
    if os.path.lexists(os.path.dirname(art.path)):
        try:
            os.close(open_verified(art))
        except SeccompError as exc:
            return f"firma run would refuse: {exc}", "", bpf
        detail += f"; stored artifact verified (sha256 {art.sha256})"
    return None, detail, bpf


def _smoke(host: Host, bpf: bytes | None) -> tuple[bool, str]:
    """Start the sandbox shape firma run uses (userns, every namespace, --disable-userns and the
    seccomp filter from memory) around `true`. Writes nothing to disk."""
    true = shutil.which("true", path=host.environ.get("PATH", os.defpath)) or "/bin/true"
    argv = [host.bwrap_path or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--proc", "/proc",
            "--dev", "/dev"]
    if host.is_root:
        argv += ["--uid", "1000", "--gid", "1000"]
    fds: tuple[int, ...] = ()
    if bpf is not None:
        fd = os.memfd_create("firma-doctor-seccomp", os.MFD_CLOEXEC)
        os.write(fd, bpf)
        os.lseek(fd, 0, os.SEEK_SET)
        fds = (fd,)
        argv += ["--seccomp", str(fd)]
    try:
        proc = subprocess.run([*argv, true], pass_fds=fds, capture_output=True, text=True,
                              timeout=15, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"bwrap could not be started: {exc}"
    finally:
        for fd in fds:
            os.close(fd)
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        return False, err
    what = "with the seccomp filter" if bpf is not None else "without seccomp"
    return True, f"test sandbox (user+net+pid namespaces, --disable-userns) started {what}"


def probe_sidecar(ep: str, timeout: float = 3.0) -> str | None:
    """None when the endpoint answers its health request (the probe `firma run` uses), else why not."""
    from .core.endpoint import validate_endpoint
    from .services.health import probe

    try:
        validate_endpoint(ep)
        probe(ep, timeout)
    except FirmaError as exc:
        return str(exc)
    return None


def _vz_error(host: Host) -> str | None:
    """The guest-input verdict from the vz backend's own validator (same texts as firma run)."""
    from .core.vzinputs import validate_guest_inputs

    try:
        validate_guest_inputs(host.environ)
    except FirmaError as exc:
        return str(exc)
    return None


def _transparent_probe() -> tuple[bool, str]:
    """In a throwaway user and network namespace (a forked child; nothing but `lo` there): add
    the local default routes firma plants in each sandbox, plant a listener on every address for
    port 443, and connect to a documentation address on it, which must land on that listener with
    the address dialled (DESIGN §5.4). Nothing can leave: the namespace has no other interface."""
    import ctypes
    import fcntl
    import socket
    import struct

    from .backends.bwrap.planting import add_local_routes  # the very routes firma run plants

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the probe child
        msg = b"FAIL unknown"
        try:
            os.close(r)
            if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) != 0:  # NEWUSER | NEWNET
                raise OSError(ctypes.get_errno(), "unshare(user, net)")
            with socket.socket() as s:  # lo up: SIOCGIFFLAGS, SIOCSIFFLAGS
                flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
                fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
            why = add_local_routes(v6=False)
            if why:
                raise OSError(0, why.decode(errors="replace"))
            with socket.socket() as lst:
                lst.bind(("0.0.0.0", 443))
                lst.listen(1)
                with socket.create_connection(("198.51.100.7", 443), timeout=2):
                    conn, _ = lst.accept()
                    got = conn.getsockname()[0]
                    conn.close()
            msg = b"OK" if got == "198.51.100.7" else b"FAIL accepted for " + got.encode()
        except OSError as exc:
            msg = f"FAIL {exc.strerror or exc} ({exc.filename or ''})".encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised here
            msg = f"FAIL {exc!r}".encode()
        finally:
            try:
                os.write(w, msg)
            finally:
                os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if data == b"OK":
        return True, "the kernel accepts `local 0.0.0.0/0 dev lo`: a connection to any address lands on a planted listener"
    return False, "local default route refused in a test namespace: " + data.decode(errors="replace")[5:]


def gather(host: Host, *, config_path: str | None = None, cwd: str | None = None,
           smoke: bool = True) -> Observations:
    from .core.planner import state_root as run_state_root

    cwd = cwd or os.getcwd()
    path, cfg, cerr = _config(host, config_path, cwd)
    try:
        state_root = run_state_root(host.environ, host.uid)
        state_facts = _facts(state_root)
    except FirmaError as exc:
        state_root, state_facts = "", PathFacts(False)
        cerr = cerr or str(exc)
    kernel_seccomp = _kernel_seccomp() if host.is_linux else False
    serr, sdetail, bpf = None, "", None
    if host.is_linux:
        details = []
        for ref in _seccomp_refs(cfg):
            err, detail, prog = _seccomp(host, ref, state_root or "/nonexistent")
            bpf = bpf if bpf is not None else prog
            if err:
                serr = serr or err
            else:
                details.append(detail)
        sdetail = "; ".join(details)
    smoke_result = None
    if host.is_linux and smoke:
        try:
            bwrap_preflight(host)
        except FirmaError:
            smoke_result = None
        else:
            smoke_result = _smoke(host, bpf)
    apparmor = None
    try:
        with open("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") as fh:
            apparmor = fh.read().strip()
    except OSError:
        pass
    endpoint = host.environ.get(env_names.SIDECAR_ENDPOINT, "").strip() or None
    if endpoint is None and cfg is not None:
        endpoint = cfg.run.get("sidecar_endpoint") or cfg.defaults.get("sidecar_endpoint")
    sidecar_error = probe_sidecar(endpoint) if endpoint and endpoint != "local" else None
    return Observations(
        config_path=path, config_error=cerr, state_root=state_root, state_root_facts=state_facts,
        kernel_seccomp=kernel_seccomp, seccomp_error=serr, seccomp_detail=sdetail,
        smoke=smoke_result, apparmor_restrict_userns=apparmor,
        sidecar_endpoint=endpoint, sidecar_error=sidecar_error,
        vz_error=_vz_error(host) if host.is_macos else None,
        transparent=_transparent_probe() if host.is_linux and smoke else None,
    )

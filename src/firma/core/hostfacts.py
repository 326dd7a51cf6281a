"""Platform facts as a value: `firma.host.detect_host` reads them once; the plan, the backends and
doctor receive them. Tests build a `Host` by hand (for example a macOS host on Linux)."""

from __future__ import annotations

from typing import Mapping

from .limits import CgroupFacts
from .record import field, record


@record
class Host:
    system: str  # "linux", "darwin", …  (platform.system().lower())
    machine: str = "x86_64"
    kernel_osrelease: str = ""
    # Raw contents of the userns knobs; None when the file does not exist on this kernel.
    unprivileged_userns_clone: str | None = None
    max_user_namespaces: str | None = None
    uid: int = 0
    gid: int = 0
    # Absolute paths of the external tools found on PATH (None when absent).
    bwrap_path: str | None = None
    bwrap_version: str | None = None  # first line of `bwrap --version`, None when it failed
    sandbox_exec_path: str | None = None
    python3_path: str | None = None  # the system python3 the exec gate runs inside the sandbox
    setsid_path: str | None = None  # util-linux setsid: makes the agent's pty its controlling terminal
    ca_bundle: str | None = None  # the system's trusted CA bundle (its real path), if one of the known ones exists
    # Why a configured or found binary was refused (trusted-binary rule), by name: preflight and
    # doctor report it instead of "not installed".
    refused_binaries: Mapping[str, str] = field(default_factory=dict)
    # The user's environment, captured once; the plan reads it, backends never do.
    environ: Mapping[str, str] = field(default_factory=dict)
    mem_total: int | None = None  # RAM in bytes (/proc/meminfo); None: unknown
    cgroups: CgroupFacts = field(default_factory=CgroupFacts)  # what firma may do with cgroups
    # The caller's hard rlimits by name (NPROC, NOFILE, FSIZE, DATA), None for unlimited: the
    # sandbox inherits them and firma only lowers them.
    rlimits: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def is_linux(self) -> bool:
        return self.system == "linux"

    @property
    def is_macos(self) -> bool:
        return self.system == "darwin"

    @property
    def is_wsl(self) -> bool:
        rel = self.kernel_osrelease.lower()
        return self.is_linux and ("microsoft" in rel or "wsl" in rel)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

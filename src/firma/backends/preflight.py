"""Host preflight for each backend: pure functions over a `Host`, no side effects.

`firma run` and `firma doctor` both call these, so their verdicts cannot disagree."""

from __future__ import annotations

from ..errors import BackendError, PreflightError, UnsupportedBackendError
from ..core.hostfacts import Host


def bwrap_preflight(host: Host) -> None:
    """Raise the first reason this host cannot run the bwrap backend (DESIGN §5)."""
    if not host.is_linux:
        raise UnsupportedBackendError.on_host(
            "bwrap", "bubblewrap backend is only available on Linux hosts"
        )
    if host.is_wsl:
        raise UnsupportedBackendError.on_host(
            "bwrap",
            f"WSL kernel detected ({host.kernel_osrelease}); network namespaces are not a "
            "reliable boundary there; use a native Linux host",
        )
    if host.unprivileged_userns_clone is not None and host.unprivileged_userns_clone == "0":
        raise PreflightError(
            "user namespaces are restricted: /proc/sys/kernel/unprivileged_userns_clone is 0; "
            "enable them with: sysctl -w kernel.unprivileged_userns_clone=1"
        )
    if host.max_user_namespaces is not None and host.max_user_namespaces == "0":
        raise PreflightError(
            "user namespaces are restricted: /proc/sys/user/max_user_namespaces is 0; "
            "enable them with: sysctl -w user.max_user_namespaces=15000"
        )
    if "bwrap" in host.refused_binaries:
        raise BackendError(
            "bwrap",
            f"{host.refused_binaries['bwrap']}; firma runs only host binaries from system "
            "directories or an absolute [host].bwrap in your own configuration",
        )
    if host.bwrap_path is None or host.bwrap_version is None:
        raise BackendError(
            "bwrap",
            "bubblewrap is not installed or not executable; install it with: "
            "apt-get install bubblewrap",
        )


def vz_host_check(host: Host) -> None:
    """The vz backend exists only on macOS (ref text)."""
    if not host.is_macos:
        raise UnsupportedBackendError.on_host("vz", "VZ backend is only available on macOS hosts")

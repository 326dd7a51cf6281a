"""One typed error family. Every user-visible failure is a FirmaError whose str() is one line
saying what failed and how to fix it; the CLI prints it as `[ERR]  <message>` and exits 1."""

from __future__ import annotations


class FirmaError(Exception):
    """Base of every error firma reports to a user."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split("\n")).strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(FirmaError):
    """firma.toml, profile or command-line resolution failed."""


class PlanError(FirmaError):
    """The launch plan cannot be built (reserved variables, bad workspace, …)."""


class UnsupportedBackendError(FirmaError):
    """An unknown backend name, or one this host cannot run."""

    @classmethod
    def unknown(cls, name: str) -> "UnsupportedBackendError":
        return cls(f"unsupported backend '{name}'; expected one of: bwrap, vz, runner")

    @classmethod
    def on_host(cls, name: str, reason: str) -> "UnsupportedBackendError":
        return cls(f"unsupported backend {name} on this host: {reason}")


class BackendError(FirmaError):
    """A backend refused to prepare or launch: `backend error (<b>): <reason>` (ref)."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend error ({backend}): {reason}")


class PreflightError(FirmaError):
    """The host cannot provide the requested confinement (tool missing, userns restricted)."""


class GateError(FirmaError):
    """A proof gate refused the launch (fail-closed disabled, non-structural without opt-in)."""


class SidecarError(FirmaError):
    """The policy sidecar could not be started, reached or made ready."""


class PolicyError(FirmaError):
    """An allow-host pattern or a Cedar policy is invalid."""


class AuditError(FirmaError):
    """The audit log or its key cannot be read, written or verified."""


class ContractError(FirmaError):
    """A launch contract cannot be built, written or validated."""


class SeccompError(FirmaError):
    """The managed seccomp policy cannot be parsed, compiled or verified."""


class LaunchError(FirmaError):
    """The sandboxed child could not be started or confined as planned."""


class CaError(FirmaError):
    """firma's HTTPS inspection CA cannot be created, read or used."""

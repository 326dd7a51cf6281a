"""macOS vz mode selection and guest input validation (DESIGN §6).

The rules are pure: they judge `PathFacts` that an injected `inspect` function returns for a
path. `inspect_path` is the one real implementation (a single `stat` that follows links), so the
filesystem is read in one clearly separated place and exactly once per variable.

Order (ref): RUNNER (with the executable check), KERNEL, INITRD, ROOTFS; the first failure wins
and is `backend error (vz): <reason>` with the reference texts."""

from __future__ import annotations

import errno
import os
import stat
from enum import StrEnum
from typing import Callable, Mapping

from ..errors import BackendError
from . import settings as env_names
from .settings import is_truthy
from .model import VzInputs
from .record import record

ENV_GUEST = env_names.VZ_GUEST
ENV_STRUCTURAL = env_names.VZ_STRUCTURAL_NETWORK
ENV_RUNNER = env_names.VZ_GUEST_RUNNER
ENV_KERNEL = env_names.VZ_GUEST_KERNEL
ENV_INITRD = env_names.VZ_GUEST_INITRD
ENV_ROOTFS = env_names.VZ_GUEST_ROOTFS
GUEST_ENV_NAMES = (ENV_RUNNER, ENV_KERNEL, ENV_INITRD, ENV_ROOTFS)


class VzMode(StrEnum):
    COMPATIBILITY = "compatibility"
    NETWORK_DENY = "network_deny"
    GUEST = "guest"

    @property
    def structural(self) -> bool:
        return self is not VzMode.COMPATIBILITY


def vz_inputs_from_environ(environ: Mapping[str, str]) -> VzInputs:
    """Capture the macOS flags and guest inputs from an environment mapping (planner, doctor)."""
    return VzInputs(
        guest=is_truthy(environ.get(ENV_GUEST)),
        structural_network=is_truthy(environ.get(ENV_STRUCTURAL)),
        runner=environ.get(ENV_RUNNER),
        kernel=environ.get(ENV_KERNEL),
        initrd=environ.get(ENV_INITRD),
        rootfs=environ.get(ENV_ROOTFS),
    )


def select_mode(inputs: VzInputs) -> VzMode:
    """Guest wins over network-deny; neither flag → compatibility (proxy-only)."""
    if inputs.guest:
        return VzMode.GUEST
    if inputs.structural_network:
        return VzMode.NETWORK_DENY
    return VzMode.COMPATIBILITY


@record
class PathFacts:
    """What one stat (following links) said about a path."""

    kind: str  # "missing" | "file" | "other" | "error"
    executable: bool = False  # any execute bit set (regular files only)
    error: str = ""  # the OS error text for kind == "error"


Inspect = Callable[[str], PathFacts]


def inspect_path(path: str) -> PathFacts:
    """The real filesystem: one `stat` following links (a dangling link is missing)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return PathFacts("missing")
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link loop resolves to nothing: it does not exist
            return PathFacts("missing")
        return PathFacts("error", error=exc.strerror or str(exc))
    if not stat.S_ISREG(st.st_mode):
        return PathFacts("other")
    return PathFacts("file", executable=bool(st.st_mode & 0o111))


@record
class GuestArtifacts:
    """Validated guest inputs: absolute paths of existing regular files, runner executable."""

    runner: str
    kernel: str
    initrd: str
    rootfs: str


def _reason(name: str, value: str | None, inspect: Inspect, *, runner: bool) -> str | None:
    if value is None:
        return f"VZ guest mode requires {name}"
    if not value.startswith("/"):  # the empty string included
        return f"{name} must be an absolute path: {value}"
    facts = inspect(value)
    if facts.kind == "missing":
        return f"{name} does not exist: {value}"
    if facts.kind == "error":
        return f"failed to inspect {name} {value}: {facts.error}"
    if facts.kind != "file":
        return f"{name} must point to a file: {value}"
    if runner and not facts.executable:
        return f"{name} must be executable: {value}"
    return None


def validate_guest_inputs(
    inputs: VzInputs | Mapping[str, str], inspect: Inspect = inspect_path
) -> GuestArtifacts:
    """Validate once, in the ref order; raise `backend error (vz): <reason>` on the first failure.

    Accepts the planner's `VzInputs` or an environment mapping (`firma doctor`)."""
    if not isinstance(inputs, VzInputs):
        inputs = vz_inputs_from_environ(inputs)
    values = (
        (ENV_RUNNER, inputs.runner, True),
        (ENV_KERNEL, inputs.kernel, False),
        (ENV_INITRD, inputs.initrd, False),
        (ENV_ROOTFS, inputs.rootfs, False),
    )
    for name, value, is_runner in values:
        reason = _reason(name, value, inspect, runner=is_runner)
        if reason is not None:
            raise BackendError("vz", reason)
    # _reason refused every None above.
    assert inputs.runner and inputs.kernel and inputs.initrd and inputs.rootfs
    return GuestArtifacts(runner=inputs.runner, kernel=inputs.kernel, initrd=inputs.initrd, rootfs=inputs.rootfs)

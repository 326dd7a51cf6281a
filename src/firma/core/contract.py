"""Launch contract v1 (DESIGN §7): the execution envelope an external runner must enforce.

Pure: an `ExecutionEnvelope` in, an ordered dict out (`build_contract`), and its pretty JSON text
(`contract_json`). Writing the file privately and starting the runner is `backends/external.py`.

`command.env` never carries a secret firma holds. The rule (`is_secret_env_name`): the capability
token `FIRMA_CAPABILITY_TOKEN`, and any `FIRMA_*` variable whose name says it is a credential
(TOKEN, SECRET, PASSWORD, PASSWD, CREDENTIAL, AUTH, KEY as a `_`-separated word, e.g.
`FIRMA_AUDIT_KEY`), compared case-insensitively. The agent's own credentials that a profile passes
through on purpose (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`) are part of its environment and stay:
that is why the file is 0600 in a 0700 directory."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import ContractError
from .model import INVARIANT_NAMES, ExecutionEnvelope, Mount
from . import settings as env_names

CONTRACT_VERSION = 1
CAPABILITY_TOKEN_ENV = env_names.CAPABILITY_TOKEN
# Words that mark a firma-internal variable as a credential (matched as whole `_`-separated words).
_SECRET_WORDS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS",
                           "AUTH", "KEY", "PRIVATE"})
GUEST_KEYS = ("kernel", "initrd", "rootfs")
OPTIONAL_INVARIANT = "fail_closed_startup"
NETWORK_KEYS = ("proxy_url", "dns_stub_addr")


def is_secret_env_name(name: str) -> bool:
    """True for a variable that must never be written into a contract (see module doc)."""
    upper = name.upper()
    if upper == CAPABILITY_TOKEN_ENV:
        return True
    if not upper.startswith("FIRMA_"):
        return False
    return any(word in _SECRET_WORDS for word in upper.split("_")[1:])


def contract_env(env: Mapping[str, str]) -> dict[str, str]:
    """The launch environment without secrets, sorted by name."""
    return {k: env[k] for k in sorted(env) if not is_secret_env_name(k)}


def _text(value: str, what: str) -> str:
    # The contract is UTF-8 JSON; a value that cannot be encoded (an undecodable byte surfaced as
    # a lone surrogate) would reach the runner altered, so refuse it instead.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ContractError(
            f"{what} is not valid UTF-8 and cannot be written into a launch contract; "
            "fix or drop that value"
        ) from None
    return value


def _network_value(envelope: ExecutionEnvelope, key: str) -> str:
    value = getattr(envelope.network, key)
    if value is None or not str(value).strip():
        raise ContractError(
            f"VZ guest launch requires {key} from network runtime; sidecar bridge was not prepared"
        )
    return str(value)


def _guest_section(guest: Any) -> dict[str, str]:
    """`guest` is a mapping or an object with kernel/initrd/rootfs attributes (GuestArtifacts)."""
    out = {}
    for key in GUEST_KEYS:
        value = guest.get(key) if isinstance(guest, Mapping) else getattr(guest, key, None)
        if not isinstance(value, str) or not value.startswith("/"):
            raise ContractError(
                f"launch contract guest {key} must be an absolute path, got {value!r}; "
                "validate the guest inputs before building the contract"
            )
        out[key] = _text(value, f"guest {key}")
    return out


def _invariants(envelope: ExecutionEnvelope) -> list[dict[str, str]]:
    """The six invariants in the fixed order; only fail_closed_startup may be disabled_by_policy."""
    modes: dict[str, str] = {}
    for inv in envelope.invariants:
        if inv.name not in INVARIANT_NAMES:
            raise ContractError(f"unknown invariant '{inv.name}' in the execution envelope")
        if inv.name in modes:
            raise ContractError(f"invariant '{inv.name}' appears twice in the execution envelope")
        allowed = ("required", "disabled_by_policy") if inv.name == OPTIONAL_INVARIANT else ("required",)
        if inv.mode not in allowed:
            raise ContractError(
                f"invariant '{inv.name}' cannot be '{inv.mode}'; allowed: {', '.join(allowed)}"
            )
        modes[inv.name] = inv.mode
    # A missing invariant is still required: the contract always states all six.
    return [{"name": n, "mode": modes.get(n, "required")} for n in INVARIANT_NAMES]


def build_contract(
    envelope: ExecutionEnvelope, runner_path: str, guest: Any = None
) -> dict[str, Any]:
    """The contract v1 as an ordered dict (key order is part of the format).

    `guest` (vz guest mode only): a mapping or object with absolute `kernel`, `initrd`, `rootfs`;
    None leaves the section out (runner backend). Raises ContractError when the network runtime
    is missing (ref text) or a value cannot be represented."""
    proxy_url = _network_value(envelope, "proxy_url")
    dns_stub_addr = _network_value(envelope, "dns_stub_addr")
    contract: dict[str, Any] = {
        "version": CONTRACT_VERSION,
        "sandbox_id": envelope.sandbox_id,
        "runtime_dir": _text(envelope.runtime_dir, "runtime_dir"),
        "runner": {"path": _text(runner_path, "runner path")},
    }
    if guest is not None:
        contract["guest"] = _guest_section(guest)
    env = {_text(k, "environment name"): _text(v, f"environment variable {k}")
           for k, v in contract_env(envelope.env).items()}
    contract["command"] = {
        "executable": _text(envelope.executable, "command executable"),
        "args": [_text(a, "command argument") for a in envelope.args],
        "cwd": _text(envelope.cwd, "command cwd"),
        "env": env,
        "identity_mode": envelope.identity_mode.contract_name,
        "seccomp_filter_path": envelope.seccomp_filter_path,
    }
    mounts = list(envelope.mounts)
    # The working directory is always mounted read-write (DESIGN §2); bwrap binds it implicitly, but
    # a runner only knows what the contract says, so it is listed first unless already there.
    if not any(m.target == envelope.cwd for m in mounts):
        mounts.insert(0, Mount(envelope.cwd, envelope.cwd, False))
    contract["mounts"] = [
        {
            "source": _text(m.source, "mount source"),
            "target": _text(m.target, "mount target"),
            "read_only": bool(m.read_only),
        }
        for m in mounts
    ]
    contract["network"] = {
        "proxy_url": proxy_url,
        "dns_stub_addr": dns_stub_addr,
        "attribution_headers": {
            k: envelope.network.attribution_headers[k]
            for k in sorted(envelope.network.attribution_headers)
        },
    }
    contract["invariants"] = _invariants(envelope)
    return contract


def contract_json(contract: Mapping[str, Any]) -> str:
    """Pretty JSON in the dict's own key order, newline-terminated."""
    return json.dumps(contract, indent=2, ensure_ascii=False) + "\n"

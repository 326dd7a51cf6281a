"""Runner-side validation of a launch contract v1 (DESIGN §7), and its JSON Schema as data.

Pure: the caller reads the file and stats it; this module only looks at bytes, a mode and (for
the optional guest section) a `file_exists` predicate it is given. Every violation is reported,
one line each, so an operator fixes a contract in one pass instead of one error at a time.

The JSON Schema says the same things as the rules where JSON Schema can say them; rules it cannot
express (file mode, byte lengths, guest files existing, header names case-insensitively) live
only in `validate_contract`."""

from __future__ import annotations

import json
import stat as stat_mod
from typing import Any, Callable, Mapping

import re

from .contract import is_secret_env_name
from .model import INVARIANT_NAMES, Mount
from .mountcheck import mount_problem
from .record import record
from . import settings as env_names
from . import wire

CONTRACT_VERSION = 1
MAX_ARGS = 256
MAX_ARG_BYTES = 4096
MAX_ENV = 256
MAX_MOUNTS = 64
MAX_HEADERS = 32
FORBIDDEN_ENV = (env_names.CAPABILITY_TOKEN,)
IDENTITY_MODES = ("sandbox_user", "host_user")
# The only invariant a policy may switch off (DESIGN §7).
OPTIONAL_INVARIANT = "fail_closed_startup"
INVARIANT_MODES = ("required", "disabled_by_policy")
SANDBOX_ID_HEADER = wire.SANDBOX_ID

TOP_KEYS = (
    "version",
    "sandbox_id",
    "runtime_dir",
    "runner",
    "guest",
    "command",
    "mounts",
    "network",
    "invariants",
)
OPTIONAL_TOP_KEYS = frozenset({"guest"})
RUNNER_KEYS = ("path",)
GUEST_KEYS = ("kernel", "initrd", "rootfs")
COMMAND_KEYS = ("executable", "args", "cwd", "env", "identity_mode", "seccomp_filter_path")
MOUNT_KEYS = ("source", "target", "read_only")
NETWORK_KEYS = ("proxy_url", "dns_stub_addr", "attribution_headers")
INVARIANT_KEYS = ("name", "mode")


@record
class Violation:
    where: str  # JSON pointer into the contract ("" = the file itself)
    problem: str

    def __str__(self) -> str:
        return f"{self.where or '/'}: {self.problem}"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated key lets two readers disagree on the contract; refuse it like an unknown key.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_contract(raw: bytes) -> tuple[Any, list[Violation]]:
    """Decode the file: strict UTF-8 JSON, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Violation("", f"not UTF-8: {exc.reason} at byte {exc.start}")]
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates), []
    except _DuplicateKey as exc:
        return None, [Violation("", f"duplicate key '{exc.args[0]}'")]
    except json.JSONDecodeError as exc:
        return None, [Violation("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
    except RecursionError:
        return None, [Violation("", "not valid JSON: nesting too deep")]


def check_file_mode(mode: int) -> list[Violation]:
    """The contract carries the launch environment: only its owner may read it."""
    out = []
    if not stat_mod.S_ISREG(mode):
        out.append(Violation("", "contract must be a regular file"))
    perms = stat_mod.S_IMODE(mode)
    if perms & 0o077:
        out.append(
            Violation(
                "",
                f"file mode {perms:04o} has group/other bits; it must be readable by its owner "
                "only (chmod 600)",
            )
        )
    return out


def parse_host_port(value: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port`; port 1..65535 in plain decimal."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            return None
        host, port_text = value[1:end], value[end + 2 :]
        if ":" not in host:
            return None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        return None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        return None
    if port_text.startswith("0"):
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    return host, port


def _typename(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


class _Checker:
    def __init__(self) -> None:
        self.out: list[Violation] = []

    def bad(self, where: str, problem: str) -> None:
        self.out.append(Violation(where, problem))

    def obj(self, v: Any, where: str, keys: tuple[str, ...], optional=frozenset()) -> bool:
        """Type-check an object and its key set (strict: unknown keys are violations)."""
        if not isinstance(v, dict):
            self.bad(where, f"must be an object, got {_typename(v)}")
            return False
        for k in v:
            if k not in keys:
                self.bad(f"{where}/{_esc(k)}", "unknown key")
        for k in keys:
            if k not in v and k not in optional:
                self.bad(f"{where}/{k}", "missing")
        return True

    def string(self, v: Any, where: str, *, nonblank=False, absolute=False) -> bool:
        if not isinstance(v, str):
            self.bad(where, f"must be a string, got {_typename(v)}")
            return False
        if nonblank and not v.strip():
            self.bad(where, "must not be blank")
            return False
        if absolute and not v.startswith("/"):
            self.bad(where, f"must be an absolute path: {v}")
            return False
        return True


def _esc(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


SANDBOX_ID = re.compile(r"^sbx_[0-9a-f]{32}$")  # firma's ids (core.identity): safe as a path name


def _surrogates(v: Any, where: str, out: list[Violation]) -> None:
    """Every string (keys too) must be Unicode scalar values: JSON's \\ud800 escapes decode to lone
    surrogates that cannot be encoded for exec, a path or a log line."""
    if isinstance(v, str):
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            out.append(Violation(where, "contains a lone surrogate (not a Unicode scalar value)"))
    elif isinstance(v, dict):
        for k, x in v.items():
            _surrogates(k, where, out)
            _surrogates(x, f"{where}/{_esc(k) if isinstance(k, str) else k}", out)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _surrogates(x, f"{where}/{i}", out)


def validate_contract(
    data: Any,
    *,
    file_exists: Callable[[str], bool] | None = None,
    realpath: Callable[[str], str] = lambda p: p,
) -> list[Violation]:
    """Every runner-side rule of DESIGN §7 except the file mode. Empty list = valid.

    `file_exists(path)` answers "is this an existing regular file" for the guest section; without
    it a guest section cannot be accepted (the rule needs the filesystem)."""
    c = _Checker()
    if not c.obj(data, "", TOP_KEYS, OPTIONAL_TOP_KEYS):
        return c.out
    before = len(c.out)
    _surrogates(data, "", c.out)
    if len(c.out) > before:
        return c.out  # the other rules would trip over the same strings

    v = data.get("version")
    if "version" in data and (type(v) is not int or v != CONTRACT_VERSION):
        c.bad("/version", f"unsupported contract version {json.dumps(v)}; expected 1")

    sandbox_id = data.get("sandbox_id")
    if "sandbox_id" in data and c.string(sandbox_id, "/sandbox_id", nonblank=True):
        if not SANDBOX_ID.match(sandbox_id):
            c.bad("/sandbox_id", "must be firma's sandbox id format sbx_<32 lowercase hex digits>")
    if "runtime_dir" in data:
        c.string(data["runtime_dir"], "/runtime_dir", absolute=True)

    runner = data.get("runner")
    if "runner" in data and c.obj(runner, "/runner", RUNNER_KEYS) and "path" in runner:
        c.string(runner["path"], "/runner/path", absolute=True)

    if "guest" in data:
        guest = data["guest"]
        if c.obj(guest, "/guest", GUEST_KEYS):
            for k in GUEST_KEYS:
                if k in guest and c.string(guest[k], f"/guest/{k}", absolute=True):
                    if file_exists is None or not file_exists(guest[k]):
                        c.bad(f"/guest/{k}", f"must be an existing file: {guest[k]}")

    if "command" in data:
        _check_command(c, data["command"])
    if "mounts" in data:
        _check_mounts(c, data["mounts"], realpath)
    if "network" in data:
        _check_network(c, data["network"], sandbox_id if isinstance(sandbox_id, str) else None)
    if "invariants" in data:
        _check_invariants(c, data["invariants"])
    return c.out


def _check_command(c: _Checker, cmd: Any) -> None:
    if not c.obj(cmd, "/command", COMMAND_KEYS):
        return
    if "executable" in cmd:
        c.string(cmd["executable"], "/command/executable", nonblank=True)
    if "args" in cmd:
        args = cmd["args"]
        if not isinstance(args, list):
            c.bad("/command/args", f"must be an array, got {_typename(args)}")
        else:
            if len(args) > MAX_ARGS:
                c.bad("/command/args", f"{len(args)} arguments; at most {MAX_ARGS} allowed")
            for i, a in enumerate(args):
                w = f"/command/args/{i}"
                if not isinstance(a, str):
                    c.bad(w, f"must be a string, got {_typename(a)}")
                elif a == "":
                    c.bad(w, "must not be empty")
                elif len(a.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
                    c.bad(w, f"longer than {MAX_ARG_BYTES} bytes")
                elif "\x00" in a:
                    c.bad(w, "must not contain NUL")
    if "cwd" in cmd:
        c.string(cmd["cwd"], "/command/cwd", absolute=True)
    if "env" in cmd:
        env = cmd["env"]
        if not isinstance(env, dict):
            c.bad("/command/env", f"must be an object, got {_typename(env)}")
        else:
            if len(env) > MAX_ENV:
                c.bad("/command/env", f"{len(env)} entries; at most {MAX_ENV} allowed")
            for k, val in env.items():
                w = f"/command/env/{_esc(k)}"
                if k in FORBIDDEN_ENV:
                    c.bad(w, "a capability token must never be written into a contract")
                elif isinstance(k, str) and is_secret_env_name(k):
                    # The builder drops these (core/contract.py); another writer must not add them.
                    c.bad(w, "a firma credential variable must never be written into a contract")
                elif not k or "=" in k or "\x00" in k:
                    c.bad(w, "invalid environment variable name")
                if not isinstance(val, str):
                    c.bad(w, f"must be a string, got {_typename(val)}")
                elif "\x00" in val:
                    c.bad(w, "must not contain NUL")
    if "identity_mode" in cmd and cmd["identity_mode"] not in IDENTITY_MODES:
        c.bad(
            "/command/identity_mode",
            f"must be one of {', '.join(IDENTITY_MODES)}, got {json.dumps(cmd['identity_mode'])}",
        )
    if "seccomp_filter_path" in cmd and cmd["seccomp_filter_path"] is not None:
        c.string(cmd["seccomp_filter_path"], "/command/seccomp_filter_path", absolute=True)


def _check_mounts(c: _Checker, mounts: Any, realpath: Callable[[str], str]) -> None:
    if not isinstance(mounts, list):
        c.bad("/mounts", f"must be an array, got {_typename(mounts)}")
        return
    if len(mounts) > MAX_MOUNTS:
        c.bad("/mounts", f"{len(mounts)} mounts; at most {MAX_MOUNTS} allowed")
    for i, m in enumerate(mounts):
        w = f"/mounts/{i}"
        if not c.obj(m, w, MOUNT_KEYS):
            continue
        if "source" in m:
            c.string(m["source"], f"{w}/source", absolute=True)
        if "target" in m:
            c.string(m["target"], f"{w}/target", absolute=True)
        if "read_only" in m and not isinstance(m["read_only"], bool):
            c.bad(f"{w}/read_only", f"must be a boolean, got {_typename(m['read_only'])}")
        elif all(isinstance(m.get(k), str) and m[k].startswith("/") for k in ("source", "target")):
            why = mount_problem(Mount(m["source"], m["target"], bool(m.get("read_only"))),
                                state_root=None, realpath=realpath)
            if why is not None:
                c.bad(w, why)


def _check_network(c: _Checker, net: Any, sandbox_id: str | None) -> None:
    if not c.obj(net, "/network", NETWORK_KEYS):
        return
    if "proxy_url" in net and c.string(net["proxy_url"], "/network/proxy_url"):
        if not net["proxy_url"].startswith("http://"):
            c.bad("/network/proxy_url", f"must start with http://, got {net['proxy_url']}")
    if "dns_stub_addr" in net and c.string(net["dns_stub_addr"], "/network/dns_stub_addr"):
        if parse_host_port(net["dns_stub_addr"]) is None:
            c.bad("/network/dns_stub_addr", f"must be host:port, got {net['dns_stub_addr']}")
    if "attribution_headers" in net:
        hdrs = net["attribution_headers"]
        w = "/network/attribution_headers"
        if not isinstance(hdrs, dict):
            c.bad(w, f"must be an object, got {_typename(hdrs)}")
            return
        if len(hdrs) > MAX_HEADERS:
            c.bad(w, f"{len(hdrs)} headers; at most {MAX_HEADERS} allowed")
        for k, val in hdrs.items():
            if not isinstance(val, str):
                c.bad(f"{w}/{_esc(k)}", f"must be a string, got {_typename(val)}")
        ids = [k for k in hdrs if k.lower() == SANDBOX_ID_HEADER]
        if len(ids) != 1:
            c.bad(w, f"must carry exactly one {SANDBOX_ID_HEADER} header, found {len(ids)}")
        elif sandbox_id is not None and hdrs[ids[0]] != sandbox_id:
            c.bad(
                f"{w}/{_esc(ids[0])}",
                f"{hdrs[ids[0]]!r} does not match sandbox_id {sandbox_id!r}",
            )


def _check_invariants(c: _Checker, invs: Any) -> None:
    if not isinstance(invs, list):
        c.bad("/invariants", f"must be an array, got {_typename(invs)}")
        return
    seen: list[str] = []
    for i, inv in enumerate(invs):
        w = f"/invariants/{i}"
        if not c.obj(inv, w, INVARIANT_KEYS):
            continue
        name, mode = inv.get("name"), inv.get("mode")
        if name not in INVARIANT_NAMES:
            c.bad(f"{w}/name", f"unknown invariant {json.dumps(name)}")
            continue
        if name in seen:
            c.bad(f"{w}/name", f"duplicate invariant {name}")
        seen.append(name)
        if "mode" not in inv:
            continue
        if mode not in INVARIANT_MODES:
            c.bad(f"{w}/mode", f"must be required or disabled_by_policy, got {json.dumps(mode)}")
        elif mode != "required" and name != OPTIONAL_INVARIANT:
            c.bad(f"{w}/mode", f"invariant {name} must be required")
    for name in INVARIANT_NAMES:
        if name not in seen:
            c.bad("/invariants", f"missing invariant {name}")
    if len(seen) == len(INVARIANT_NAMES) == len(set(seen)) and tuple(seen) != INVARIANT_NAMES:
        c.bad("/invariants", f"invariants must be in the fixed order: {', '.join(INVARIANT_NAMES)}")


MAX_CONTRACT_BYTES = 4 * 1024 * 1024  # a contract file larger than this is refused unread


def validate_contract_bytes(
    raw: bytes, mode: int, *, file_exists: Callable[[str], bool] | None = None,
    realpath: Callable[[str], str] = lambda p: p,
) -> list[Violation]:
    """Every rule, file mode included, for a file's bytes and its `st_mode`."""
    out = check_file_mode(mode)
    data, errs = parse_contract(raw)
    if errs:
        return out + errs
    return out + validate_contract(data, file_exists=file_exists, realpath=realpath)


# ---------------------------------------------------------------------------------------------
# JSON Schema (draft 2020-12). Data, not code: `firma contract schema` prints it.

_ABS = {"type": "string", "pattern": "^/"}
_PORT_RE = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"


def _object(props: Mapping[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(props),
        "required": list(required),
        "additionalProperties": False,
    }


def contract_schema() -> dict[str, Any]:
    invariant_items = []
    for name in INVARIANT_NAMES:
        modes = list(INVARIANT_MODES) if name == OPTIONAL_INVARIANT else ["required"]
        invariant_items.append(
            _object({"name": {"const": name}, "mode": {"enum": modes}}, INVARIANT_KEYS)
        )
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://firma.invalid/schemas/launch-contract-v1.json",
        "title": "firma launch contract v1",
        "description": (
            "The execution envelope a runner must enforce, plus six invariants (DESIGN §7). "
            "Rules JSON Schema cannot express are checked by `firma contract validate`: file mode "
            "0600, argument length in bytes, guest files existing, firma credential variable names "
            "(FIRMA_*_KEY, _TOKEN, _SECRET, …), the sandbox-id header equal to sandbox_id."
        ),
        **_object(
            {
                "version": {"const": CONTRACT_VERSION},
                "sandbox_id": {"type": "string", "pattern": "\\S"},
                "runtime_dir": _ABS,
                "runner": _object({"path": _ABS}, RUNNER_KEYS),
                "guest": _object({k: _ABS for k in GUEST_KEYS}, GUEST_KEYS),
                "command": _object(
                    {
                        "executable": {"type": "string", "pattern": "\\S"},
                        "args": {
                            "type": "array",
                            "maxItems": MAX_ARGS,
                            "items": {"type": "string", "minLength": 1, "maxLength": MAX_ARG_BYTES},
                        },
                        "cwd": _ABS,
                        "env": {
                            "type": "object",
                            "maxProperties": MAX_ENV,
                            "propertyNames": {
                                "minLength": 1,
                                "not": {"enum": list(FORBIDDEN_ENV)},
                                "pattern": "^[^=\\u0000]+$",
                            },
                            "additionalProperties": {"type": "string"},
                        },
                        "identity_mode": {"enum": list(IDENTITY_MODES)},
                        "seccomp_filter_path": {"oneOf": [{"type": "null"}, _ABS]},
                    },
                    COMMAND_KEYS,
                ),
                "mounts": {
                    "type": "array",
                    "maxItems": MAX_MOUNTS,
                    "items": _object(
                        {"source": _ABS, "target": _ABS, "read_only": {"type": "boolean"}},
                        MOUNT_KEYS,
                    ),
                },
                "network": _object(
                    {
                        "proxy_url": {"type": "string", "pattern": "^http://"},
                        "dns_stub_addr": {
                            "type": "string",
                            "pattern": "^(\\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\\]|[^\\s:\\[\\]/?#@]+):" + _PORT_RE + "$",
                        },
                        "attribution_headers": {
                            "type": "object",
                            "maxProperties": MAX_HEADERS,
                            "required": [SANDBOX_ID_HEADER],
                            "additionalProperties": {"type": "string"},
                        },
                    },
                    NETWORK_KEYS,
                ),
                "invariants": {
                    "type": "array",
                    "minItems": len(INVARIANT_NAMES),
                    "prefixItems": invariant_items,
                    "items": False,
                },
            },
            tuple(k for k in TOP_KEYS if k not in OPTIONAL_TOP_KEYS),
        ),
    }
    return schema

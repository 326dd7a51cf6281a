"""Runner-side contract validation (DESIGN §7): one row per rule, the CLI, and the JSON Schema."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys

import jsonschema
import pytest

from firma.core.contract_validate import (
    check_file_mode,
    contract_schema,
    parse_contract,
    parse_host_port,
    validate_contract,
    validate_contract_bytes,
)
from firma.core.model import INVARIANT_NAMES

SBX = "sbx_0192f0c8a1b27c3d9e4f5a6b7c8d9e0f"


def good_contract() -> dict:
    return {
        "version": 1,
        "sandbox_id": SBX,
        "runtime_dir": f"/tmp/firma-0/run/{SBX}",
        "runner": {"path": "/usr/local/bin/my-runner"},
        "command": {
            "executable": "/usr/bin/python3",
            "args": ["-c", "print(1)"],
            "cwd": "/home/dev/project",
            "env": {"HOME": "/home/dev", "HTTP_PROXY": "http://127.0.0.1:40001"},
            "identity_mode": "sandbox_user",
            "seccomp_filter_path": None,
        },
        "mounts": [{"source": "/home/dev/project", "target": "/home/dev/project", "read_only": False}],
        "network": {
            "proxy_url": "http://127.0.0.1:40001",
            "dns_stub_addr": "127.0.0.1:40002",
            "attribution_headers": {
                "x-firma-agent": "generic",
                "x-firma-profile": "generic",
                "x-firma-sandbox-id": SBX,
                "x-firma-session-id": "s1",
                "x-firma-user": "dev",
            },
        },
        "invariants": [{"name": n, "mode": "required"} for n in INVARIANT_NAMES],
    }


def _set(d, path, value):
    *parents, last = path
    for p in parents:
        d = d[p]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value


DELETE = object()


def mutated(*edits):
    c = good_contract()
    for path, value in edits:
        _set(c, path, value)
    return c


def invariants(*pairs):
    return [{"name": n, "mode": m} for n, m in pairs]


REQ = [(n, "required") for n in INVARIANT_NAMES]

# (id, contract, expected (pointer, problem fragment) in the violations)
TABLE = [
    ("unknown top key", mutated((("extra",), 1)), ("/extra", "unknown key")),
    ("unknown nested key", mutated((("command", "shell"), "/bin/sh")), ("/command/shell", "unknown key")),
    ("unknown network key", mutated((("network", "upstream"), "x")), ("/network/upstream", "unknown key")),
    ("missing key", mutated((("network",), DELETE)), ("/network", "missing")),
    ("wrong version", mutated((("version",), 2)), ("/version", "unsupported contract version 2")),
    ("version as string", mutated((("version",), "1")), ("/version", "unsupported contract version")),
    ("version as bool", mutated((("version",), True)), ("/version", "unsupported contract version")),
    ("blank sandbox id", mutated((("sandbox_id",), "   ")), ("/sandbox_id", "must not be blank")),
    ("empty sandbox id", mutated((("sandbox_id",), "")), ("/sandbox_id", "must not be blank")),
    ("relative runtime_dir", mutated((("runtime_dir",), "run/x")), ("/runtime_dir", "absolute path")),
    ("relative runner path", mutated((("runner", "path"), "bin/runner")), ("/runner/path", "absolute path")),
    ("relative cwd", mutated((("command", "cwd"), "project")), ("/command/cwd", "absolute path")),
    ("257 args", mutated((("command", "args"), ["a"] * 257)), ("/command/args", "257 arguments")),
    ("empty arg", mutated((("command", "args"), ["-c", ""])), ("/command/args/1", "must not be empty")),
    ("arg over 4096 bytes", mutated((("command", "args"), ["é" * 2049])), ("/command/args/0", "4096 bytes")),
    ("non-string arg", mutated((("command", "args"), [1])), ("/command/args/0", "must be a string")),
    (
        "capability token in env",
        mutated((("command", "env", "FIRMA_CAPABILITY_TOKEN"), "tok")),
        ("/command/env/FIRMA_CAPABILITY_TOKEN", "capability token"),
    ),
    (
        "firma credential variable in env",
        mutated((("command", "env", "FIRMA_AUDIT_KEY"), "k")),
        ("/command/env/FIRMA_AUDIT_KEY", "credential variable"),
    ),
    ("257 env entries", mutated((("command", "env"), {f"V{i}": "x" for i in range(257)})), ("/command/env", "257 entries")),
    ("bad identity mode", mutated((("command", "identity_mode"), "root")), ("/command/identity_mode", "must be one of")),
    ("relative seccomp path", mutated((("command", "seccomp_filter_path"), "f.bpf")), ("/command/seccomp_filter_path", "absolute")),
    ("65 mounts", mutated((("mounts",), [{"source": "/a", "target": "/a", "read_only": True}] * 65)), ("/mounts", "65 mounts")),
    ("relative mount source", mutated((("mounts", 0, "source"), "src")), ("/mounts/0/source", "absolute")),
    ("relative mount target", mutated((("mounts", 0, "target"), "dst")), ("/mounts/0/target", "absolute")),
    ("proxy_url not http", mutated((("network", "proxy_url"), "https://127.0.0.1:1")), ("/network/proxy_url", "http://")),
    ("bad dns_stub_addr no port", mutated((("network", "dns_stub_addr"), "127.0.0.1")), ("/network/dns_stub_addr", "host:port")),
    ("bad dns_stub_addr port text", mutated((("network", "dns_stub_addr"), "127.0.0.1:dns")), ("/network/dns_stub_addr", "host:port")),
    ("bad dns_stub_addr port 0", mutated((("network", "dns_stub_addr"), "127.0.0.1:0")), ("/network/dns_stub_addr", "host:port")),
    ("bad dns_stub_addr port too big", mutated((("network", "dns_stub_addr"), "127.0.0.1:70000")), ("/network/dns_stub_addr", "host:port")),
    ("bad dns_stub_addr bare v6", mutated((("network", "dns_stub_addr"), "::1:53")), ("/network/dns_stub_addr", "host:port")),
    (
        "sandbox-id header mismatch",
        mutated((("network", "attribution_headers", "x-firma-sandbox-id"), "sbx_other")),
        ("/network/attribution_headers/x-firma-sandbox-id", "does not match sandbox_id"),
    ),
    (
        "sandbox-id header missing",
        mutated((("network", "attribution_headers", "x-firma-sandbox-id"), DELETE)),
        ("/network/attribution_headers", "exactly one x-firma-sandbox-id header, found 0"),
    ),
    (
        "sandbox-id header twice (case)",
        mutated((("network", "attribution_headers", "X-Firma-Sandbox-Id"), SBX)),
        ("/network/attribution_headers", "exactly one x-firma-sandbox-id header, found 2"),
    ),
    (
        "33 headers",
        mutated((("network", "attribution_headers"), {"x-firma-sandbox-id": SBX, **{f"h{i}": "v" for i in range(32)}})),
        ("/network/attribution_headers", "33 headers"),
    ),
    ("duplicate invariant", mutated((("invariants",), invariants(*REQ, REQ[0]))), ("/invariants/6/name", "duplicate invariant sidecar_only_egress")),
    ("missing invariant", mutated((("invariants",), invariants(*REQ[:-1]))), ("/invariants", "missing invariant preserve_stdio_signals_exit")),
    ("unknown invariant", mutated((("invariants",), invariants(*REQ, ("teleport", "required")))), ("/invariants/6/name", "unknown invariant")),
    (
        "disabled_by_policy on a required invariant",
        mutated((("invariants", 1, "mode"), "disabled_by_policy")),
        ("/invariants/1/mode", "invariant dns_confined must be required"),
    ),
    ("bad invariant mode", mutated((("invariants", 0, "mode"), "optional")), ("/invariants/0/mode", "must be required or disabled_by_policy")),
    ("invariants out of order", mutated((("invariants",), invariants(*reversed(REQ)))), ("/invariants", "fixed order")),
    ("guest relative path", mutated((("guest",), {"kernel": "vmlinuz", "initrd": "/i", "rootfs": "/r"})), ("/guest/kernel", "absolute")),
    ("guest missing file", mutated((("guest",), {"kernel": "/nonexistent/k", "initrd": "/i", "rootfs": "/r"})), ("/guest/kernel", "existing file")),
    ("guest unknown key", mutated((("guest",), {"kernel": "/k", "initrd": "/i", "rootfs": "/r", "disk": "/d"})), ("/guest/disk", "unknown key")),
    ("not an object", [1, 2], ("/", "must be an object")),
]


def _existing(path: str) -> bool:
    return path in {"/k", "/i", "/r"}


def test_good_contract_is_valid():
    assert validate_contract(good_contract(), file_exists=_existing) == []
    jsonschema.Draft202012Validator(contract_schema()).validate(good_contract())


def test_disabled_by_policy_allowed_on_fail_closed_startup():
    c = mutated((("invariants", 2, "mode"), "disabled_by_policy"))
    assert validate_contract(c) == []
    jsonschema.Draft202012Validator(contract_schema()).validate(c)


def test_guest_section_with_existing_files_is_valid():
    c = mutated((("guest",), {"kernel": "/k", "initrd": "/i", "rootfs": "/r"}))
    assert validate_contract(c, file_exists=_existing) == []


@pytest.mark.parametrize("name,contract,expected", TABLE, ids=[t[0] for t in TABLE])
def test_rule(name, contract, expected):
    violations = validate_contract(contract, file_exists=_existing)
    lines = [str(v) for v in violations]
    where, fragment = expected
    assert any(
        v.where in (where, "" if where == "/" else where) and fragment in v.problem for v in violations
    ), lines
    # The schema agrees wherever JSON Schema can express the rule.
    if name not in {"arg over 4096 bytes", "guest missing file", "sandbox-id header mismatch",
                    "sandbox-id header twice (case)", "firma credential variable in env"}:
        assert not jsonschema.Draft202012Validator(contract_schema()).is_valid(contract), name


def test_sandbox_id_header_rules_are_exact_even_where_schema_is_weaker():
    # The schema cannot compare two values; the validator must.
    c = mutated((("network", "attribution_headers", "x-firma-sandbox-id"), "sbx_other"))
    assert jsonschema.Draft202012Validator(contract_schema()).is_valid(c)
    assert validate_contract(c)


def test_every_violation_reported_not_only_the_first():
    c = mutated(
        (("version",), 3),
        (("sandbox_id",), ""),
        (("command", "args"), ["", "x"]),
        (("network", "proxy_url"), "socks5://x"),
    )
    wheres = {v.where for v in validate_contract(c)}
    assert {"/version", "/sandbox_id", "/command/args/0", "/network/proxy_url"} <= wheres


@pytest.mark.parametrize(
    "mode,ok",
    [(0o100600, True), (0o100400, True), (0o100640, False), (0o100604, False), (0o100644, False), (0o100660, False)],
)
def test_file_mode_rule(mode, ok):
    violations = check_file_mode(mode)
    assert (violations == []) is ok
    if not ok:
        assert "group/other bits" in violations[0].problem and "chmod 600" in violations[0].problem


def test_file_mode_rule_rejects_non_regular():
    assert check_file_mode(stat.S_IFIFO | 0o600)


def test_duplicate_json_key_rejected():
    raw = b'{"version": 1, "version": 1}'
    data, errs = parse_contract(raw)
    assert data is None and "duplicate key 'version'" in errs[0].problem


def test_non_json_and_non_utf8():
    assert "not valid JSON" in validate_contract_bytes(b"{", 0o100600)[0].problem
    assert "not UTF-8" in validate_contract_bytes(b"\xff", 0o100600)[0].problem


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:53", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("localhost:1", ("localhost", 1)),
        ("127.0.0.1", None),
        (":53", None),
        ("[::1]53", None),
        ("127.0.0.1:+53", None),
        ("127.0.0.1:065536", None),
        ("127.0.0.1:0053", None),
        ("a b:53", None),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


# --- the CLI -------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "firma", "contract", *args], capture_output=True, text=True, timeout=60
    )


def _write(tmp_path, contract, mode=0o600, name="launch.json"):
    p = tmp_path / name
    p.write_text(json.dumps(contract, indent=2))
    os.chmod(p, mode)
    return p


def test_cli_validate_ok(tmp_path):
    p = _write(tmp_path, good_contract())
    r = _cli("validate", str(p))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{p}: valid launch contract v1"


def test_cli_validate_world_readable_file(tmp_path):
    p = _write(tmp_path, good_contract(), mode=0o644)
    r = _cli("validate", str(p))
    assert r.returncode == 1
    assert r.stderr.strip() == f"{p}: /: file mode 0644 has group/other bits; it must be readable by its owner only (chmod 600)"


def test_cli_validate_one_line_per_violation(tmp_path):
    c = mutated((("extra",), 1), (("command", "args"), ["a"] * 257), (("command", "env", "FIRMA_CAPABILITY_TOKEN"), "t"))
    p = _write(tmp_path, c, mode=0o644)
    r = _cli("validate", str(p))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{p}: ") for line in lines)
    assert r.stdout == ""


def test_cli_validate_refuses_symlink(tmp_path):
    p = _write(tmp_path, good_contract())
    link = tmp_path / "link.json"
    link.symlink_to(p)
    r = _cli("validate", str(link))
    assert r.returncode == 1 and r.stderr.startswith("[ERR]  cannot open launch contract")


def test_cli_schema_is_draft_2020_12_and_checks_contracts():
    r = _cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(good_contract())
    bad = copy.deepcopy(good_contract())
    bad["command"]["env"]["FIRMA_CAPABILITY_TOKEN"] = "x"
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)

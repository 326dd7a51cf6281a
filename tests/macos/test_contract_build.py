"""core/contract.py: the launch contract v1 shape (DESIGN §7) — key order at every level, the six
invariants in order, the missing-network refusal (ref text), and no secret in command.env."""

from __future__ import annotations

import json

import pytest

from firma.core.contract import build_contract, contract_json, is_secret_env_name
from firma.core.contract_validate import validate_contract
from firma.core.model import INVARIANT_NAMES, IdentityMode, Invariant
from firma.errors import ContractError
from vz_fixtures import SBX, SECRET_VALUE, envelope

GUEST = {"kernel": "/vm/vmlinuz", "initrd": "/vm/initrd.img", "rootfs": "/vm/rootfs.img"}


def test_key_order_at_every_level_with_guest(tmp_path):
    c = build_contract(envelope(tmp_path), "/opt/runner", guest=GUEST)
    # Order survives the JSON text, not only the dict.
    c = json.loads(contract_json(c))
    assert list(c) == ["version", "sandbox_id", "runtime_dir", "runner", "guest", "command",
                       "mounts", "network", "invariants"]
    assert list(c["runner"]) == ["path"]
    assert list(c["guest"]) == ["kernel", "initrd", "rootfs"]
    assert list(c["command"]) == ["executable", "args", "cwd", "env", "identity_mode",
                                  "seccomp_filter_path"]
    assert all(list(m) == ["source", "target", "read_only"] for m in c["mounts"])
    assert list(c["network"]) == ["proxy_url", "dns_stub_addr", "attribution_headers"]
    assert list(c["network"]["attribution_headers"]) == sorted(c["network"]["attribution_headers"])
    assert list(c["command"]["env"]) == sorted(c["command"]["env"])
    assert all(list(i) == ["name", "mode"] for i in c["invariants"])
    assert [i["name"] for i in c["invariants"]] == list(INVARIANT_NAMES) == [
        "sidecar_only_egress", "dns_confined", "fail_closed_startup", "fail_closed_runtime",
        "direct_bypass_resistant", "preserve_stdio_signals_exit"]
    assert [i["mode"] for i in c["invariants"]] == ["required"] * 6


def test_values_come_from_the_envelope(tmp_path):
    env = envelope(tmp_path, identity_mode=IdentityMode.HOST_USER)
    c = build_contract(env, "/opt/runner", guest=GUEST)
    assert c["version"] == 1 and c["sandbox_id"] == SBX
    assert c["runtime_dir"] == env.runtime_dir
    assert c["runner"] == {"path": "/opt/runner"}
    assert c["guest"] == GUEST
    assert c["command"]["executable"] == "/usr/bin/true"
    assert c["command"]["args"] == ["a", "b c"]
    assert c["command"]["cwd"] == str(tmp_path)
    assert c["command"]["identity_mode"] == "host_user"
    assert c["command"]["seccomp_filter_path"] is None
    assert c["mounts"] == [{"source": str(tmp_path), "target": str(tmp_path), "read_only": False},
                           {"source": "/usr", "target": "/usr", "read_only": True}]
    assert c["network"]["proxy_url"] == "http://127.0.0.1:41000"
    assert c["network"]["dns_stub_addr"] == "127.0.0.1:41001"
    assert c["network"]["attribution_headers"]["x-firma-sandbox-id"] == SBX
    assert build_contract(envelope(tmp_path), "/r")["command"]["identity_mode"] == "sandbox_user"


def test_runner_backend_contract_has_no_guest_section_and_validates(tmp_path):
    c = build_contract(envelope(tmp_path), "/opt/runner")
    assert "guest" not in c
    assert list(c)[:4] == ["version", "sandbox_id", "runtime_dir", "runner"]
    assert list(c)[4] == "command"
    assert validate_contract(json.loads(contract_json(c))) == []


def test_guest_contract_validates_runner_side(tmp_path):
    files = {}
    for k in ("kernel", "initrd", "rootfs"):
        (tmp_path / k).write_bytes(b"x")
        files[k] = str(tmp_path / k)
    c = json.loads(contract_json(build_contract(envelope(tmp_path), "/opt/runner", guest=files)))
    import os
    assert validate_contract(c, file_exists=os.path.isfile) == []


@pytest.mark.parametrize("key", ["proxy_url", "dns_stub_addr"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_network_runtime_fails_with_ref_text(tmp_path, key, value):
    env = envelope(tmp_path, **{key: value})
    with pytest.raises(ContractError) as exc:
        build_contract(env, "/opt/runner", guest=GUEST)
    assert str(exc.value) == (
        f"VZ guest launch requires {key} from network runtime; sidecar bridge was not prepared")


def test_proxy_url_checked_before_dns_stub(tmp_path):
    with pytest.raises(ContractError, match="requires proxy_url"):
        build_contract(envelope(tmp_path, proxy_url=None, dns_stub_addr=None), "/r")


@pytest.mark.parametrize("name", [
    "FIRMA_CAPABILITY_TOKEN", "firma_capability_token", "FIRMA_SIDECAR_TOKEN", "FIRMA_AUDIT_KEY",
    "FIRMA_PROXY_PASSWORD", "FIRMA_CA_PRIVATE_KEY", "FIRMA_AUTH", "FIRMA_SECRET",
    "FIRMA_X_CREDENTIALS",
])
def test_secret_names(name):
    assert is_secret_env_name(name)


@pytest.mark.parametrize("name", [
    "FIRMA_RUN_SANDBOX_ID", "FIRMA_RUN_SESSION_ID", "FIRMA_RUN_PROFILE", "FIRMA_AGENT_ID",
    "FIRMA_DNS_STUB_ADDR", "FIRMA_RUN_KEEP_MARKERS", "FIRMA_KEYBOARD", "HTTP_PROXY", "HOME",
    # The agent's own credentials, passed through by its profile on purpose, are its environment.
    "ANTHROPIC_API_KEY", "OPENAI_API_KEY",
])
def test_not_secret_names(name):
    assert not is_secret_env_name(name)


def test_no_capability_token_or_firma_secret_in_command_env(tmp_path):
    env = envelope(tmp_path, env={
        "FIRMA_CAPABILITY_TOKEN": SECRET_VALUE,
        "FIRMA_SIDECAR_TOKEN": SECRET_VALUE + "2",
        "ANTHROPIC_API_KEY": "agent-key",
    })
    c = build_contract(env, "/opt/runner", guest=GUEST)
    text = contract_json(c)
    assert "FIRMA_CAPABILITY_TOKEN" not in c["command"]["env"]
    assert "FIRMA_SIDECAR_TOKEN" not in c["command"]["env"]
    assert SECRET_VALUE not in text and "CAPABILITY_TOKEN" not in text
    assert c["command"]["env"]["ANTHROPIC_API_KEY"] == "agent-key"
    assert c["command"]["env"]["FIRMA_RUN_SANDBOX_ID"] == SBX
    assert validate_contract(json.loads(text), file_exists=lambda p: p in GUEST.values()) == []


def test_invariants_always_six_in_fixed_order_whatever_the_envelope_order(tmp_path):
    shuffled = tuple(Invariant(n) for n in reversed(INVARIANT_NAMES[1:]))  # one missing, reversed
    c = build_contract(envelope(tmp_path, invariants=shuffled), "/r")
    assert [i["name"] for i in c["invariants"]] == list(INVARIANT_NAMES)
    assert [i["mode"] for i in c["invariants"]] == ["required"] * 6


def test_only_fail_closed_startup_may_be_disabled(tmp_path):
    invs = tuple(Invariant(n, "disabled_by_policy" if n == "fail_closed_startup" else "required")
                 for n in INVARIANT_NAMES)
    c = build_contract(envelope(tmp_path, invariants=invs), "/r")
    assert [i["mode"] for i in c["invariants"]] == [
        "required", "required", "disabled_by_policy", "required", "required", "required"]
    bad = tuple(Invariant(n, "disabled_by_policy" if n == "dns_confined" else "required")
                for n in INVARIANT_NAMES)
    with pytest.raises(ContractError, match="dns_confined"):
        build_contract(envelope(tmp_path, invariants=bad), "/r")
    with pytest.raises(ContractError, match="unknown invariant"):
        build_contract(envelope(tmp_path, invariants=(Invariant("bogus"),)), "/r")
    with pytest.raises(ContractError, match="twice"):
        build_contract(envelope(tmp_path, invariants=(Invariant("dns_confined"),) * 2), "/r")


def test_guest_paths_must_be_absolute(tmp_path):
    with pytest.raises(ContractError, match="guest initrd must be an absolute path"):
        build_contract(envelope(tmp_path), "/r", guest={**GUEST, "initrd": "initrd.img"})


def test_guest_accepts_an_object_with_attributes(tmp_path):
    from types import SimpleNamespace
    c = build_contract(envelope(tmp_path), "/r", guest=SimpleNamespace(**GUEST))
    assert c["guest"] == GUEST


def test_undecodable_env_value_is_refused_not_altered(tmp_path):
    env = envelope(tmp_path, env={"WEIRD": "a\udcff"})
    with pytest.raises(ContractError, match="WEIRD is not valid UTF-8"):
        build_contract(env, "/r")


def test_contract_json_is_pretty_and_newline_terminated(tmp_path):
    text = contract_json(build_contract(envelope(tmp_path), "/r"))
    assert text.startswith('{\n  "version": 1,\n  "sandbox_id": ')
    assert text.endswith("}\n")


from hypothesis import given, settings, strategies as st  # noqa: E402 - the property tests below need hypothesis; the table tests above do not

_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="="), min_size=1,
                 max_size=24)
_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                  max_size=40)


@settings(max_examples=150, deadline=None)
@given(extra=st.dictionaries(_names | st.sampled_from(["FIRMA_CAPABILITY_TOKEN", "FIRMA_X_TOKEN",
                                                         "firma_audit_key"]), _values, max_size=12))
def test_any_environment_gives_a_valid_contract_without_secret_names(tmp_path_factory, extra):
    tmp = tmp_path_factory.mktemp("h")
    c = json.loads(contract_json(build_contract(envelope(tmp, env=extra), "/opt/runner")))
    assert validate_contract(c) == []
    assert not any(is_secret_env_name(k) for k in c["command"]["env"])
    for k, v in extra.items():
        if not is_secret_env_name(k):
            assert c["command"]["env"][k] == v


def test_workspace_is_always_a_read_write_mount(tmp_path):
    ws = tmp_path / "ws"
    c = build_contract(envelope(tmp_path, cwd=str(ws)), "/r")
    assert c["mounts"][0] == {"source": str(ws), "target": str(ws), "read_only": False}
    assert len(c["mounts"]) == 3
    # Already listed (here read-write at the same target): not duplicated.
    c = build_contract(envelope(tmp_path), "/r")
    assert [m["target"] for m in c["mounts"]].count(str(tmp_path)) == 1

"""What HTTPS inspection and credential brokering add to a run's plan (DESIGN §5.7,
firma.core.inspectplan.plan_inspection): refusals, when the sandbox trusts firma's CA, the mounts
and variables that make it so, and the per-run credential placeholders."""

from __future__ import annotations

import re

import pytest

from firma.core.credentials import parse_credentials
from firma.core.inspectplan import (
    BUNDLE_INSIDE,
    CA_ENV,
    JAVA_ENV,
    TRUSTSTORE_INSIDE,
    InspectionPlan,
    plan_inspection,
)
from firma.core.model import Mount
from firma.errors import ConfigError

CFG = "/home/u/.config/firma/firma.toml"
RUN_DIR = "/state/run/sbx_0190aaaabbbbccccddddeeeeffff0000"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
RAND = bytes(range(32))
SECRET = "ghp_TOPSECRETvalue0123456789"


def creds(**tables):
    """[credentials.NAME] tables: NAME=(env var, source)."""
    body = {name: {"hosts": [f"api.{name}.test"], "env": env, "source": source} for name, (env, source) in tables.items()}
    return parse_credentials(body, CFG)


GITHUB = creds(github=("GITHUB_TOKEN", "env:FIRMA_GITHUB_TOKEN"))


def plan(**over):
    args = dict(inspect=(), no_inspect=(), credentials=(), policy_path=None, embedded=True, backend="bwrap",
                run_dir=RUN_DIR, system_bundle=SYSTEM_BUNDLE, rand=RAND, passthrough=())
    args.update(over)
    return plan_inspection(**args)


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("what", [dict(inspect=("api.github.com",)), dict(credentials=GITHUB)])
def test_inspect_or_credentials_need_the_embedded_sidecar(what):
    with pytest.raises(ConfigError) as info:
        plan(embedded=False, **what)
    assert "embedded sidecar" in str(info.value)
    plan(embedded=True, **what)  # control


@pytest.mark.parametrize("backend", ["vz", "runner"])
@pytest.mark.parametrize("what", [dict(inspect=("api.github.com",)), dict(credentials=GITHUB)])
def test_inspect_or_credentials_need_bwrap(what, backend):
    with pytest.raises(ConfigError) as info:
        plan(backend=backend, **what)
    assert "bwrap backend" in str(info.value) and f"not {backend}" in str(info.value)
    plan(backend="bwrap", **what)  # control


def test_a_policy_alone_is_never_refused():
    for embedded, backend in ((False, "bwrap"), (True, "vz"), (False, "vz")):
        p, mounts, env = plan(policy_path="/p.cedar", embedded=embedded, backend=backend)
        assert not p.trust and mounts == () and env == {}


def test_a_credential_whose_env_source_is_passed_to_the_agent_is_refused():
    with pytest.raises(ConfigError) as info:
        plan(credentials=GITHUB, passthrough=("HOME", "FIRMA_GITHUB_TOKEN"))
    assert "FIRMA_GITHUB_TOKEN" in str(info.value) and "[credentials.github]" in str(info.value)
    # controls: another variable passed through, or the secret read from a file, is fine
    plan(credentials=GITHUB, passthrough=("HOME", "GITHUB_USER"))
    plan(credentials=creds(github=("GITHUB_TOKEN", "file:/home/u/.secrets/FIRMA_GITHUB_TOKEN")),
         passthrough=("FIRMA_GITHUB_TOKEN",))


# ------------------------------------------------------------------------------------- trust


@pytest.mark.parametrize("what", [dict(inspect=("*.example.com",)), dict(credentials=GITHUB), dict(policy_path="/p.cedar")])
def test_trust_when_embedded_bwrap_and_something_may_be_inspected(what):
    p, mounts, env = plan(**what)
    assert p.trust and p.system_bundle == SYSTEM_BUNDLE
    assert p.describe()["ca_trusted_inside"] is True
    assert mounts == (
        Mount(f"{RUN_DIR}/ca-bundle.pem", "/run/firma/ca-bundle.pem", True, generated=True),
        Mount(f"{RUN_DIR}/ca-truststore.p12", "/run/firma/ca-truststore.p12", True, generated=True),
        Mount(f"{RUN_DIR}/ca-bundle.pem", SYSTEM_BUNDLE, True, generated=True),
    )
    assert all(m.read_only and m.generated for m in mounts)


def test_no_trust_without_anything_to_inspect():
    p, mounts, env = plan()
    assert not p.trust and p.system_bundle is None and mounts == () and env == {}
    assert p == InspectionPlan()
    # no_inspect alone inspects nothing
    p, mounts, env = plan(no_inspect=("pinned.example.com",))
    assert not p.trust and mounts == () and env == {} and p.no_inspect == ("pinned.example.com",)


def test_no_system_bundle_mount_when_the_host_has_none():
    p, mounts, env = plan(inspect=("api.github.com",), system_bundle=None)
    assert p.trust and p.system_bundle is None
    assert [m.target for m in mounts] == [BUNDLE_INSIDE, TRUSTSTORE_INSIDE]
    assert env["SSL_CERT_FILE"] == BUNDLE_INSIDE  # the variables still name the bundle


def test_ca_variables_all_name_the_bundle_and_java_the_trust_store():
    p, mounts, env = plan(inspect=("api.github.com",))
    assert BUNDLE_INSIDE == "/run/firma/ca-bundle.pem" and TRUSTSTORE_INSIDE == "/run/firma/ca-truststore.p12"
    expected = {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
                "PIP_CERT", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT"}
    assert set(CA_ENV) == expected
    for name in expected:
        assert env[name] == "/run/firma/ca-bundle.pem", name
    java = env[JAVA_ENV].split()
    assert "-Djavax.net.ssl.trustStore=/run/firma/ca-truststore.p12" in java
    assert "-Djavax.net.ssl.trustStoreType=PKCS12" in java
    assert "-Djavax.net.ssl.trustStorePassword=changeit" in java
    assert set(env) == expected | {JAVA_ENV}


# ------------------------------------------------------------------------------ placeholders

PLACEHOLDER = re.compile(r"firma-cred-([a-z0-9_-]+)-([0-9a-f]{32})")


def test_credential_variables_hold_their_placeholder(monkeypatch):
    monkeypatch.setenv("FIRMA_GITHUB_TOKEN", SECRET)
    two = creds(github=("GITHUB_TOKEN", "env:FIRMA_GITHUB_TOKEN"), npm=("NPM_TOKEN", "file:/home/u/.npm-token"))
    p, mounts, env = plan(credentials=two)
    assert set(p.placeholders) == {"github", "npm"}
    for c in two:
        ph = p.placeholders[c.name]
        m = PLACEHOLDER.fullmatch(ph)
        assert m and m.group(1) == c.name, ph
        assert env[c.env] == ph
    assert p.placeholders["github"] != p.placeholders["npm"]
    assert p.placeholders["github"][-32:] != p.placeholders["npm"][-32:]  # not only the name differs
    # the secret (in firma's environment) is nowhere in what the agent gets
    for value in list(env.values()) + list(p.placeholders.values()):
        assert SECRET not in value
    assert SECRET not in repr(p.describe())
    d = p.describe()["credentials"]
    assert [x["source"] for x in d] == ["env", "file"] and [x["env"] for x in d] == ["GITHUB_TOKEN", "NPM_TOKEN"]


def test_placeholders_are_new_each_run_and_stable_for_a_run():
    a = plan(credentials=GITHUB, rand=b"\x01" * 32)[0].placeholders["github"]
    b = plan(credentials=GITHUB, rand=b"\x02" * 32)[0].placeholders["github"]
    again = plan(credentials=GITHUB, rand=b"\x01" * 32)[0].placeholders["github"]
    assert a != b and a == again


def test_placeholder_of_a_name_does_not_depend_on_its_variable_or_source():
    x = plan(credentials=creds(github=("GITHUB_TOKEN", "env:A")))[0].placeholders["github"]
    y = plan(credentials=creds(github=("GH_TOKEN", "file:/b")))[0].placeholders["github"]
    z = plan(credentials=creds(gitlab=("GITHUB_TOKEN", "env:A")))[0].placeholders["gitlab"]
    assert x == y  # same run, same credential name
    assert x[-32:] != z[-32:]  # another name draws another token


def test_placeholders_are_read_only():
    p = plan(credentials=GITHUB)[0]
    with pytest.raises(TypeError):
        p.placeholders["github"] = "x"  # type: ignore[index]

"""The everyday run options, parsed (core.runopts) and the runtime proxy variables (launchenv)."""

from __future__ import annotations

import pytest

from firma.core import launchenv, runopts
from firma.core.model import Mount
from firma.errors import ConfigError


def test_env_specs():
    assert runopts.parse_env(("A", "B=1", "A", "C=", "D=x=y")) == (("A",), {"B": "1", "C": "", "D": "x=y"})
    for bad in ("", "=x", "1A", "A-B", "A B=1"):
        with pytest.raises(ConfigError, match="--env"):
            runopts.parse_env((bad,))


@pytest.mark.parametrize("spec,want", [
    ("data", Mount("/w/data", "/w/data", False)),
    ("/d:/tmp/d", Mount("/d", "/tmp/d", False)),
    ("/d:/tmp/d:ro", Mount("/d", "/tmp/d", True)),
    ("/d:ro", Mount("/d", "/d", True)),
    ("../x:/tmp/x:rw", Mount("/x", "/tmp/x", False)),
])
def test_mount_specs(spec, want):
    assert runopts.parse_mount(spec, "/w") == want


@pytest.mark.parametrize("spec", ["", ":/x", "/a:/b:/c", "/a:rel", "/a:/b:xx:ro"])
def test_bad_mount_specs(spec):
    with pytest.raises(ConfigError, match="--mount"):
        runopts.parse_mount(spec, "/w")


@pytest.mark.parametrize("text,secs", [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                       ("500ms", 0.5), ("0.5", 0.5), (" 5S ", 5)])
def test_durations(text, secs):
    assert runopts.parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "0", "-1", "10x", "1h30m", "s"])
def test_bad_durations(text):
    with pytest.raises(ConfigError, match="--timeout"):
        runopts.parse_duration(text)


def test_runtime_proxy_variables():
    env = launchenv.runtime_proxy_env("http://127.0.0.1:18080", {})
    assert env["NODE_USE_ENV_PROXY"] == "1"
    assert env["JAVA_TOOL_OPTIONS"] == ("-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort=18080 -Dhttps.proxyHost=127.0.0.1 "
                                        "-Dhttps.proxyPort=18080 -Dhttp.nonProxyHosts=")
    kept = launchenv.runtime_proxy_env("http://127.0.0.1:18080", {"JAVA_TOOL_OPTIONS": "-Xmx1g"})["JAVA_TOOL_OPTIONS"]
    assert kept.startswith("-Xmx1g -Dhttp.proxyHost=")
    # a proxy URL with a credential (macOS bridge): the JVM properties could not carry it
    assert "JAVA_TOOL_OPTIONS" not in launchenv.runtime_proxy_env("http://u:s@127.0.0.1:5000", {})

"""core/sbpl.py: DESIGN §6 profile text and port parsing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from firma.core.sbpl import NETWORK_DENY_COMMENT, SbplInput, parse_port, render_sbpl, sandbox_exec_argv
from firma.errors import BackendError


@pytest.mark.parametrize("value, port", [
    ("http://127.0.0.1:18080", 18080),
    ("http://127.0.0.1:18080/", 18080),
    ("http://127.0.0.1:18080/x?q=1", 18080),
    ("127.0.0.1:5353", 5353),
    ("http://[::1]:18080", 18080),
    ("[::1]:53", 53),
    ("http://localhost:1", 1),
    ("http://127.0.0.1:65535#frag", 65535),
])
def test_port_parsing_accepts(value, port):
    assert parse_port(value) == port


@pytest.mark.parametrize("value", [
    "127.0.0.1", "http://127.0.0.1:notaport", "http://127.0.0.1", "http://127.0.0.1/", "127.0.0.1:",
    "http://[::1]", "[::1]", "http://[::1]x:80", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1",
    "127.0.0.1:+80", "127.0.0.1: 80", "127.0.0.1:٨٠", "", "http://127.0.0.1:80:80x",
])
def test_port_parsing_rejects(value):
    with pytest.raises(BackendError) as exc:
        parse_port(value)
    assert str(exc.value).startswith("backend error (vz): cannot derive a loopback port from ")


def test_network_deny_profile_exact_text():
    text = render_sbpl(SbplInput(network_deny=True, loopback_ports=(41001, 41000)))
    assert text == (
        "(version 1)\n"
        "(allow default)\n"
        "; macOS structural: deny all outbound, allow only Firma loopback endpoints\n"
        "(deny network-outbound)\n"
        '(allow network-outbound (remote ip4 "localhost:41000"))\n'
        '(allow network-outbound (remote ip6 "localhost:41000"))\n'
        '(allow network-outbound (remote ip4 "localhost:41001"))\n'
        '(allow network-outbound (remote ip6 "localhost:41001"))\n'
    )


def test_deny_comes_after_allow_default():
    lines = render_sbpl(SbplInput(network_deny=True, loopback_ports=(5353,))).splitlines()
    assert lines.index("(deny network-outbound)") > lines.index("(allow default)")
    assert lines.index(NETWORK_DENY_COMMENT) == lines.index("(deny network-outbound)") - 1
    # every allow-outbound line comes after the deny (last match wins in SBPL)
    allows = [i for i, row in enumerate(lines) if row.startswith("(allow network-outbound")]
    assert allows and min(allows) > lines.index("(deny network-outbound)")


@given(st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=6))
def test_never_a_portless_loopback_rule(ports):
    text = render_sbpl(SbplInput(network_deny=True, loopback_ports=tuple(ports)))
    outbound = [row for row in text.splitlines() if "network-outbound (remote" in row]
    assert len(outbound) == 2 * len(set(ports))
    for line in outbound:
        m = re.fullmatch(r'\(allow network-outbound \(remote ip[46] "localhost:(\d+)"\)\)', line)
        assert m and int(m.group(1)) in ports
    assert '"localhost"' not in text and "localhost:*" not in text and "localhost:0" not in text
    found = [int(p) for p in re.findall(r'localhost:(\d+)"', text)]
    assert found == sorted(found)


def test_network_deny_without_ports_is_refused():
    with pytest.raises(BackendError, match="needs the bridge and DNS stub ports"):
        render_sbpl(SbplInput(network_deny=True, loopback_ports=()))
    with pytest.raises(BackendError, match="invalid loopback port"):
        render_sbpl(SbplInput(network_deny=True, loopback_ports=(0,)))


def test_compatibility_profile_has_no_network_rule():
    assert render_sbpl(SbplInput(network_deny=False)) == "(version 1)\n(allow default)\n"


CLAUDE_MASKS = (".ssh", ".aws", ".azure", ".kube", ".gnupg", ".config/gcloud", ".docker", ".netrc")


def test_claude_code_home_masks_deny_read_and_write():
    text = render_sbpl(SbplInput(network_deny=True, loopback_ports=(1,), home="/Users/ann/",
                                 mask_home_paths=CLAUDE_MASKS))
    lines = text.splitlines()
    masks = lines[lines.index('(allow network-outbound (remote ip6 "localhost:1"))') + 1:]
    expected = []
    for p in CLAUDE_MASKS:
        expected += [f'(deny file-read* (subpath "/Users/ann/{p}"))',
                     f'(deny file-write* (subpath "/Users/ann/{p}"))']
    assert masks == expected


def test_mask_paths_escape_backslash_and_quote():
    text = render_sbpl(SbplInput(network_deny=False, home='/Users/a"b\\c', mask_home_paths=(".ssh",)))
    assert '(deny file-read* (subpath "/Users/a\\"b\\\\c/.ssh"))' in text.splitlines()
    assert '(deny file-write* (subpath "/Users/a\\"b\\\\c/.ssh"))' in text.splitlines()


@pytest.mark.parametrize("bad", ["..", "a/../..", ""])
def test_mask_paths_cannot_climb_out_of_home(bad):
    with pytest.raises(BackendError):
        render_sbpl(SbplInput(network_deny=False, home="/Users/a", mask_home_paths=(bad,)))


def test_sandbox_exec_argv_shape():
    assert sandbox_exec_argv("/usr/bin/sandbox-exec", "(version 1)\n", "/bin/echo", ("a", "b")) == [
        "/usr/bin/sandbox-exec", "-p", "(version 1)\n", "/bin/echo", "a", "b"]

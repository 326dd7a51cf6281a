"""Host canonicalization (every DESIGN §9 spelling) and address classes (ATTACKS C.1 9-10, C.2 13-14)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firma.core.addrclass import forbidden_class
from firma.core.hostcanon import HostError, canon_host, split_authority

SAME = [
    ("EVIL.com", "evil.com", "name"),
    ("evil.com.", "evil.com", "name"),
    ("Evil.COM.", "evil.com", "name"),
    ("127.1", "127.0.0.1", "ipv4"),
    ("0x7f.0.0.1", "127.0.0.1", "ipv4"),
    ("0x7F.1", "127.0.0.1", "ipv4"),
    ("2130706433", "127.0.0.1", "ipv4"),
    ("017700000001", "127.0.0.1", "ipv4"),
    ("0177.0.0.01", "127.0.0.1", "ipv4"),
    ("127.0.0.1.", "127.0.0.1", "ipv4"),
    ("2852039166", "169.254.169.254", "ipv4"),
    ("[::1]", "::1", "ipv6"),
    ("[0:0:0:0:0:ffff:7f00:1]", "::ffff:7f00:1", "ipv6"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1", "ipv6"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe", "ipv6"),
    ("bücher.example", "xn--bcher-kva.example", "name"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example", "name"),
    ("\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11", "127.0.0.1", "ipv4"),  # full-width digits and dots
    ("ＥＶＩＬ.com", "evil.com", "name"),
    ("evil\u3002com", "evil.com", "name"),
]


@pytest.mark.parametrize("raw,host,kind", SAME)
def test_spellings_canonicalize(raw, host, kind):
    c = canon_host(raw)
    assert (c.host, c.kind) == (host, kind)


INVALID = [
    "",
    "evil.com\x00.allowed.com",
    "evil.com\r\n.allowed.com",
    "evil.com\n",
    "[::ffff:127.0.0.1%x.allowed.com]",
    "::ffff:127.0.0.1%x.allowed.com",
    "allowed.com@evil.com",
    "a" * 256,
    ("a" * 63 + ".") * 4 + "com",
    "evil..com",
    ".evil.com",
    "evil.com..",
    "256.0.0.1",
    "1.2.3.4.5",
    "0x100000000",
    "08.0.0.1",
    "[::1",
    "[not-v6]",
    "ev il.com",
    "evil.com/x",
    "-" * 64 + ".com",
    "a_b\t.com",
]


@pytest.mark.parametrize("raw", INVALID)
def test_injection_and_malformed_hosts_rejected(raw):
    with pytest.raises(HostError):
        canon_host(raw)


def test_split_authority_ports_userinfo_and_brackets():
    assert split_authority("EVIL.com:8080", 80)[1] == 8080
    assert split_authority("[::1]:443", None)[0].host == "::1"
    assert split_authority("evil.com", 80)[1] == 80
    for bad in ("allowed.com@evil.com", "u:p@evil.com:80", "::1:443", "evil.com:0", "evil.com:65536", "evil.com:+80", "evil.com:", "[::1]x"):
        with pytest.raises(HostError):
            split_authority(bad, 80)
    with pytest.raises(HostError):
        split_authority("evil.com", None)  # CONNECT needs a port


@pytest.mark.parametrize(
    "ip,cls",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("169.254.1.1", "link_local"),
        ("169.254.169.254", "metadata"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.5", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link_local"),
        ("fd00::1", "private"),
        ("ff02::1", "multicast"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:127.0.0.1", "mapped:loopback"),
        ("::ffff:169.254.169.254", "mapped:metadata"),
        ("64:ff9b::a9fe:a9fe", "nat64:metadata"),
        ("64:ff9b::a00:1", "nat64:private"),
        ("2002:a9fe:a9fe::", "6to4:metadata"),
        ("2002:7f00:1::1", "6to4:loopback"),
        ("2002:c0a8:0101::", "6to4:private"),
        ("::127.0.0.1", "compat:loopback"),
        ("2001::1", "teredo"),
    ],
)
def test_forbidden_classes(ip, cls):
    assert forbidden_class(ip) == cls


@pytest.mark.parametrize("ip", ["93.184.216.34", "2606:4700::1111", "::ffff:93.184.216.34", "172.32.0.1", "100.128.0.1"])
def test_public_addresses_pass(ip):
    assert forbidden_class(ipaddress.ip_address(ip)) is None


def test_same_destination_for_decision_and_dial():
    """Every spelling of loopback ends as one canonical host that classifies as non-public."""
    for raw in ("127.1", "0x7f.0.0.1", "2130706433", "017700000001", "[::ffff:127.0.0.1]", "[0:0:0:0:0:ffff:7f00:1]"):
        assert forbidden_class(canon_host(raw).host) in ("loopback", "mapped:loopback")




@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=80), st.from_regex(r"[0-9a-fA-Fx.:\[\]]{1,30}", fullmatch=True)))
def test_property_canon_only_raises_host_error_and_is_idempotent(raw):
    try:
        c = canon_host(raw)
    except HostError:
        return
    again = canon_host(f"[{c.host}]" if c.kind == "ipv6" else c.host)
    assert again == c
    assert c.host == c.host.lower() and "\x00" not in c.host and "%" not in c.host

"""Credential brokering, the pure part (DESIGN §5.7): the [credentials.NAME] table, placeholders,
secrets, the broker's inject/stray decisions, and the body scanners' chunk-boundary properties."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firma.core.credentials import (
    MAX_SECRET,
    Broker,
    Credential,
    CredentialError,
    CredentialSpec,
    MultiReplacer,
    NeedleScanner,
    StreamReplacer,
    parse_credentials,
    placeholder,
    refuse_shared_env,
    replace_all,
    validate_secret,
)
from firma.errors import ConfigError

PATH = "/home/u/.config/firma/firma.toml"
TOKEN = "0123456789abcdef" * 2
SECRET = b"ghp_TOPSECRETvalue0123456789"


def table(**over):
    body = {"hosts": ["api.github.com"], "env": "GITHUB_TOKEN", "source": "env:FIRMA_GITHUB_TOKEN"}
    body.update(over)
    return {"github": {k: v for k, v in body.items() if v is not None}}


def refused(tbl, *needles):
    with pytest.raises(ConfigError) as info:
        parse_credentials(tbl, PATH)
    msg = str(info.value)
    assert "\n" not in msg and PATH in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------------------ the table


def test_a_full_table_parses_with_defaults_and_each_source_kind():
    (spec,) = parse_credentials(table(), PATH)
    assert spec == CredentialSpec(name="github", hosts=("api.github.com",), env="GITHUB_TOKEN", header="Authorization",
                                  format="Bearer {secret}", source_kind="env", source_arg="FIRMA_GITHUB_TOKEN")
    (spec,) = parse_credentials(table(hosts=[" *.example.com ", "10.0.0.1:8443"], header="X-Api-Key", format="{secret}",
                                      source="file:/etc/firma/token"), PATH)
    assert spec.hosts == ("*.example.com", "10.0.0.1:8443")
    assert (spec.header, spec.format, spec.source_kind, spec.source_arg) == ("X-Api-Key", "{secret}", "file", "/etc/firma/token")
    (spec,) = parse_credentials(table(source="command:/usr/bin/pass show 'api token'"), PATH)
    assert spec.source_kind == "command" and spec.source_arg == ("/usr/bin/pass", "show", "api token")
    assert parse_credentials({}, PATH) == ()


@pytest.mark.parametrize("name", ["", "Github", "-x", "_x", "a.b", "a b", "a" * 33, "é", 5])
def test_credential_names_are_refused_unless_lowercase_and_short(name):
    refused({name: table()["github"]}, "credential name")


@pytest.mark.parametrize("name", ["a", "0", "a" * 32, "my_cred-2"])
def test_credential_names_accepted(name):
    assert parse_credentials({name: table()["github"]}, PATH)[0].name == name


def test_the_table_and_each_credential_must_be_tables():
    with pytest.raises(ConfigError, match="credentials' must be a table"):
        parse_credentials(["x"], PATH)  # type: ignore[arg-type]
    refused({"github": "env:X"}, "credentials.github must be a table")


def test_unknown_and_missing_keys_are_refused():
    refused(table(secret="x"), "credentials.github", "unknown key 'secret'")
    for key in ("hosts", "env", "source"):
        refused(table(**{key: None}), f"credentials.github.{key} is required")


@pytest.mark.parametrize("hosts", ["api.github.com", [], [1], ["*.com"], ["a*.example.com"], ["host:0"], [""], ["u@host"]])
def test_hosts_must_be_a_non_empty_list_of_valid_patterns(hosts):
    refused(table(hosts=hosts), "credentials.github.hosts")


@pytest.mark.parametrize("env", ["", "1X", "A-B", "A B", "A=B", 7])
def test_env_must_be_a_variable_name(env):
    refused(table(env=env), "credentials.github.env")


RESERVED = ["PATH", "path", "HOME", "USER", "LOGNAME", "SHELL", "LD_PRELOAD", "ld_library_path", "DYLD_INSERT_LIBRARIES",
            "PYTHONPATH", "PYTHONHOME", "pythonstartup", "HTTP_PROXY", "https_proxy", "All_Proxy", "NO_PROXY", "no_proxy",
            "FTP_PROXY", "NODE_USE_ENV_PROXY", "FIRMA_TOKEN", "firma_token", "BASH_ENV", "NODE_OPTIONS",
            "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
            "PIP_CERT", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT", "JAVA_TOOL_OPTIONS"]


@pytest.mark.parametrize("env", RESERVED)
def test_reserved_variables_are_refused(env):
    refused(table(env=env), "credentials.github.env", "reserved")


def test_two_credentials_may_not_share_a_variable():
    body = table()["github"]
    msg = refused({"a": body, "b": dict(body)}, "credentials.b.env", "credentials.a")
    assert "GITHUB_TOKEN" in msg
    assert len(parse_credentials({"a": body, "b": dict(body, env="OTHER")}, PATH)) == 2
    specs = parse_credentials({"a": body}, PATH) + parse_credentials({"b": dict(body)}, "/other.toml")
    with pytest.raises(ConfigError, match="credentials.a"):
        refuse_shared_env(specs, "merged config")  # across files, after merging


@pytest.mark.parametrize("header", ["", "Author ization", "a:b", "X-Key\r\n", "Ünï", 3,
                                    "Host", "content-length", "Transfer-Encoding", "Connection", "keep-alive", "TE",
                                    "Trailer", "Upgrade", "Expect", "Proxy-Authorization", "proxy-anything",
                                    "X-Firma-Agent", "x-firma-anything"])
def test_headers_that_are_not_tokens_or_frame_route_or_belong_to_firma_are_refused(header):
    refused(table(header=header), "credentials.github.header")


@pytest.mark.parametrize("header", ["Authorization", "authorization", "X-Api-Key", "Cookie", "PRIVATE-TOKEN"])
def test_ordinary_credential_headers_including_cookie_are_accepted(header):
    assert parse_credentials(table(header=header), PATH)[0].header == header


@pytest.mark.parametrize("fmt", ["Bearer", "{secret}{secret}", "Bearer {secret}\r\nX: y", "Bearer {secret}\n", "tok\x00{secret}",
                                 "Bearer\x7f{secret}", "Bëarer {secret}", "{SECRET}", 1])
def test_format_needs_exactly_one_slot_and_printable_ascii(fmt):
    refused(table(format=fmt), "credentials.github.format")


def test_format_accepts_text_around_the_slot():
    assert parse_credentials(table(format="token={secret}; v=1"), PATH)[0].format == "token={secret}; v=1"


@pytest.mark.parametrize("source", ["", "FIRMA_X", "env:", "env:1A", "env:A-B", "file:", "file:relative/path", "file:~/t",
                                    "command:", "command:prog arg", "command:/bin/sh -c 'unbalanced", "http://x", "vault:x",
                                    "env:A\x00", 5])
def test_malformed_sources_are_refused(source):
    refused(table(source=source), "credentials.github.source")


# ------------------------------------------------------------------- placeholders, secrets


def test_placeholder_shape_and_token_validation():
    assert placeholder("github", TOKEN) == f"firma-cred-github-{TOKEN}"
    assert placeholder("a", "f" * 64).endswith("-" + "f" * 64)
    for token in ("", "0" * 31, TOKEN.upper(), "g" * 32, TOKEN + "-", " " + TOKEN):
        with pytest.raises(CredentialError):
            placeholder("github", token)
    with pytest.raises(CredentialError):
        placeholder("Bad Name", TOKEN)


def test_validate_secret_strips_one_trailing_newline_only():
    assert validate_secret(SECRET, "g") == SECRET
    assert validate_secret(SECRET + b"\n", "g") == SECRET
    assert validate_secret(SECRET + b"\r\n", "g") == SECRET
    assert validate_secret(b"a\tb", "g") == b"a\tb"  # a tab inside is fine in a header
    for bad in (SECRET + b"\n\n", SECRET + b"\r\n\r\n", SECRET + b"\r"):
        with pytest.raises(CredentialError):
            validate_secret(bad, "g")


def test_validate_secret_size_bounds():
    assert validate_secret(b"x" * MAX_SECRET, "g") == b"x" * MAX_SECRET
    assert validate_secret(b"x" * MAX_SECRET + b"\n", "g") == b"x" * MAX_SECRET
    for bad in (b"", b"\n", b"\r\n", b"x" * (MAX_SECRET + 1)):
        with pytest.raises(CredentialError, match=r"\[credentials\.g\]"):
            validate_secret(bad, "g")


@pytest.mark.parametrize("bad", [b"\r", b"\n", b"\x00", b"\x01", b"\x1f", b"\x7f", b"\x80", b"\xff", b"\x1b[31m"])
def test_validate_secret_refuses_injection_bytes_and_never_quotes_the_secret(bad):
    secret = b"TOPSECRET" + bad + b"TAIL"
    with pytest.raises(CredentialError) as info:
        validate_secret(secret, "github")
    msg = str(info.value)
    assert "[credentials.github]" in msg and "\n" not in msg
    assert "TOPSECRET" not in msg and "TAIL" not in msg and "TOPSECRET" not in repr(info.value)


@pytest.mark.parametrize("secret", [b" TOPSECRET", b"TOPSECRET ", b"\tTOPSECRET", b"TOPSECRET\t\n"])
def test_validate_secret_refuses_surrounding_blanks_which_http_strips(secret):
    with pytest.raises(CredentialError, match="blank") as info:
        validate_secret(secret, "g")
    assert "TOPSECRET" not in str(info.value)


# ---------------------------------------------------------------------------- the broker


def spec(name="github", hosts=("api.github.com",), env="GITHUB_TOKEN", header="Authorization", fmt="Bearer {secret}"):
    return CredentialSpec(name=name, hosts=tuple(hosts), env=env, header=header, format=fmt, source_kind="env",
                          source_arg="FIRMA_" + env)


def cred(name="github", secret=SECRET, token=TOKEN, **kw):
    return Credential(spec=spec(name, **kw), placeholder=placeholder(name, token), secret=secret)


GH = cred()
NPM = cred("npm", b"npm_OTHERSECRET42", "f" * 32, hosts=("registry.npmjs.org", "*.npm.example.com:8443"), env="NPM_TOKEN",
           header="X-Api-Key", fmt="{secret}")


def broker():
    return Broker((GH, NPM))


def test_a_credential_never_shows_its_secret():
    for text in (repr(GH), str(GH), repr(broker().response_replacer(["github"])), repr((GH,))):
        assert SECRET.decode() not in text
    assert "firma-cred-github-" in repr(GH)
    assert GH.header_value() == b"Bearer " + SECRET and GH.header_text() == "Bearer " + SECRET.decode()
    assert NPM.header_value() == NPM.secret


def test_the_broker_refuses_credentials_not_made_by_the_helpers():
    with pytest.raises(CredentialError) as info:
        Broker((cred(secret=SECRET + b"\n"),))
    assert SECRET.decode() not in str(info.value)
    with pytest.raises(CredentialError):
        Broker((Credential(spec=spec(), placeholder=placeholder("npm", TOKEN), secret=SECRET),))
    with pytest.raises(CredentialError):
        Broker((GH, cred(token="e" * 32)))  # the same name twice


def test_bound_matches_hosts_ports_and_wildcards():
    b = broker()
    assert b.bound("api.github.com", 443) == (GH,)
    assert b.bound("api.github.com", 80) == (GH,)
    assert b.bound("api.github.com", 8443) == ()
    assert b.bound("github.com", 443) == () and b.bound("evil.api.github.com", 443) == ()
    assert b.bound("registry.npmjs.org", 443) == (NPM,)
    assert b.bound("x.npm.example.com", 8443) == (NPM,)
    assert b.bound("x.npm.example.com", 443) == () and b.bound("npm.example.com", 8443) == ()


def test_inject_replaces_the_whole_named_header_case_insensitively():
    b = broker()
    ph = GH.placeholder
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        headers = (("Host", "api.github.com"), (name, f"token {ph} trailing"), ("Accept", "*/*"))
        out, injected = b.inject(headers, "api.github.com", 443)
        assert out == (("Host", "api.github.com"), (name, "Bearer " + SECRET.decode()), ("Accept", "*/*"))
        assert injected == ("github",)


def test_inject_never_puts_a_credential_on_another_host():
    b = broker()
    headers = (("Authorization", f"Bearer {GH.placeholder}"), ("X-Api-Key", NPM.placeholder))
    for host, port in (("evil.com", 443), ("github.com", 443), ("api.github.com", 8443), ("api.github.com.evil.com", 443)):
        assert b.inject(headers, host, port) == (headers, ())
    out, injected = b.inject(headers, "registry.npmjs.org", 443)  # only npm is bound there
    assert out == (("Authorization", f"Bearer {GH.placeholder}"), ("X-Api-Key", NPM.secret.decode()))
    assert injected == ("npm",)


def test_inject_needs_the_placeholder_in_the_named_header():
    b = broker()
    headers = (("Authorization", "Bearer something-else"), ("X-Other", GH.placeholder), ("Authorization", GH.placeholder))
    out, injected = b.inject(headers, "api.github.com", 443)
    assert out == (("Authorization", "Bearer something-else"), ("X-Other", GH.placeholder),
                   ("Authorization", "Bearer " + SECRET.decode()))
    assert injected == ("github",)
    assert b.inject((("Authorization", NPM.placeholder),), "api.github.com", 443) == ((("Authorization", NPM.placeholder),), ())
    assert Broker().inject(headers, "api.github.com", 443) == (headers, ())


def test_two_credentials_on_one_host_and_header_each_take_only_their_own_placeholder():
    other = cred("gh2", b"SECOND_secret_xyz", "d" * 32, env="GH2")
    b = Broker((GH, other))
    out, injected = b.inject((("Authorization", other.placeholder), ("authorization", GH.placeholder)), "api.github.com", 443)
    assert out == (("Authorization", "Bearer SECOND_secret_xyz"), ("authorization", "Bearer " + SECRET.decode()))
    assert injected == ("gh2", "github")


def test_stray_strict_rule():
    b = broker()
    ph = GH.placeholder
    host = ("api.github.com", 443)
    assert b.stray(*host, target="/repos", headers=(("Authorization", "Bearer " + ph),)) is None
    assert b.stray(*host, target="/repos", headers=(("authorization", ph),)) is None
    assert b.stray(*host, target="/repos", headers=(("Authorization", ph),), after_inject=True) == "github"
    assert b.stray(*host, target=f"/repos?t={ph}", headers=()) == "github"  # the URL, even to its own host
    assert b.stray(*host, target="/", headers=(("X-Token", ph),)) == "github"  # another header
    assert b.stray(*host, target="/", headers=((ph, "x"),)) == "github"  # a header name
    assert b.stray(*host, target="/", headers=(("Authorization", NPM.placeholder),)) == "npm"  # npm is not bound here
    assert b.stray(*host, target="/", headers=(("X-Api-Key", NPM.placeholder),)) == "npm"
    assert b.stray("evil.com", 443, target="/", headers=(("Authorization", "Bearer " + ph),)) == "github"
    assert b.stray("api.github.com", 8443, target="/", headers=(("Authorization", ph),)) == "github"
    assert b.stray("registry.npmjs.org", 443, target="/", headers=(("x-api-key", NPM.placeholder),)) is None
    assert b.stray("evil.com", 443, target="/firma-cred-github-nottoken", headers=(("A", "firma-cred-"),)) is None
    assert b.stray(f"{ph}.wild.example.com", 443, target="", headers=()) == "github"  # a DNS label, an SNI
    assert Broker().stray("evil.com", 443, target=f"/{ph}", headers=()) is None


def test_after_injection_the_head_holds_no_placeholder():
    b = broker()
    headers = (("Authorization", GH.placeholder), ("Accept", "*/*"))
    out, _ = b.inject(headers, "api.github.com", 443)
    assert b.stray("api.github.com", 443, target="/", headers=out, after_inject=True) is None


def test_needles_and_response_replacer():
    b = broker()
    assert dict(b.needles()) == {"github": GH.placeholder.encode(), "npm": NPM.placeholder.encode()}
    assert b.response_replacer(()) is None
    r = b.response_replacer(["github", "github"])
    assert r is not None
    assert r.whole(f"echo {SECRET.decode()} and {NPM.secret.decode()}") == f"echo {GH.placeholder} and {NPM.secret.decode()}"
    s = r.stream()
    body = b"x" * 100 + SECRET + b"y" * 3
    out = b"".join(s.feed(body[i:i + 7]) for i in range(0, len(body), 7)) + s.flush()
    assert out == b"x" * 100 + GH.placeholder.encode() + b"yyy"
    with pytest.raises(KeyError):
        b.response_replacer(["nope"])


# ------------------------------------------------------------------------------- streams


def scan(needles, chunks):
    s = NeedleScanner(needles)
    out, found = [], None
    for c in chunks:
        data, found = s.feed(c)
        out.append(data)
        if found:
            break
    if not found:
        out.append(s.flush())
    return b"".join(out), found


def chunked(data, cuts):
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


NEEDLE = b"firma-cred-github-" + TOKEN.encode()


def test_a_needle_split_at_every_offset_is_caught_and_never_forwarded():
    data = b"A" * 50 + NEEDLE + b"B" * 50
    start = 50
    for i in range(len(data) + 1):
        for j in range(i, min(len(data), i + len(NEEDLE) + 2) + 1):
            out, found = scan({"github": NEEDLE}, chunked(data, [i, j]))
            assert found == "github", (i, j)
            assert out == data[: len(out)] and len(out) <= start, (i, j)
            assert NEEDLE not in out


def test_a_needle_fed_byte_by_byte_is_caught_before_its_first_byte():
    data = b"prefix " + NEEDLE + b" suffix"
    out, found = scan({"github": NEEDLE}, [data[i:i + 1] for i in range(len(data))])
    assert found == "github" and out == b"prefix "


def test_without_needles_the_output_is_the_input():
    s = NeedleScanner({})
    assert s.feed(b"abc") == (b"abc", None) and s.feed(b"") == (b"", None) and s.flush() == b""


def test_after_a_find_nothing_more_is_forwarded_and_the_earliest_needle_wins():
    s = NeedleScanner({"a": b"needle-a", "b": b"needle-bb"})
    assert s.feed(b"xx needle-bb yy needle-a") == (b"xx ", "b")
    assert s.feed(b"more") == (b"", "b") and s.flush() == b""
    with pytest.raises(ValueError):
        NeedleScanner({"a": b""})


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_scanner_without_a_match_forwards_everything_exactly(data, cuts):
    needles = {"x": NEEDLE, "y": b"firma-cred-npm-" + b"f" * 32}
    data = data.replace(b"firma", b"firmA")
    out, found = scan(needles, chunked(data, cuts))
    assert found is None and out == data


@given(st.binary(max_size=200), st.binary(max_size=200), st.lists(st.integers(0, 500), max_size=8))
def test_scanner_with_a_needle_anywhere_catches_it(before, after, cuts):
    data = before + NEEDLE + after
    first = data.find(NEEDLE)
    out, found = scan({"github": NEEDLE}, chunked(data, cuts))
    assert found == "github" and out == data[: len(out)] and len(out) <= first


def replaced(r, data, cuts):
    return b"".join(r.feed(c) for c in chunked(data, cuts)) + r.flush()


def test_stream_replacer_with_old_split_at_every_offset():
    old, new = b"SECRET-xyz", b"firma-cred-x-" + b"0" * 32
    data = b"a" * 20 + old + b"b" + old + old + b"c" * 5
    want = data.replace(old, new)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert replaced(StreamReplacer(old, new), data, [i, j]) == want, (i, j)


@pytest.mark.parametrize("data", [b"aaa", b"aaaa", b"aaaaa", b"baaab", b"aabaa", b"a", b""])
def test_stream_replacer_overlapping_occurrences_every_chunking(data):
    want = data.replace(b"aa", b"X")
    n = len(data)
    for mask in range(1 << max(n - 1, 0)):
        cuts = [i + 1 for i in range(n - 1) if mask >> i & 1]
        assert replaced(StreamReplacer(b"aa", b"X"), data, cuts) == want, cuts


@given(st.binary(max_size=400).map(lambda b: bytes(x % 3 + 97 for x in b)),  # a, b, c: many overlaps
       st.binary(min_size=1, max_size=5).map(lambda b: bytes(x % 3 + 97 for x in b)),
       st.binary(max_size=6), st.lists(st.integers(0, 400), max_size=12))
def test_stream_replacer_equals_bytes_replace_for_any_chunking(data, old, new, cuts):
    assert replaced(StreamReplacer(old, new), data, cuts) == data.replace(old, new)


def test_stream_replacer_random_chunkings_of_a_large_body():
    rnd = random.Random(7)
    old, new = SECRET, b"firma-cred-github-" + TOKEN.encode()
    parts = [rnd.randbytes(rnd.randrange(0, 3000)) for _ in range(40)]
    data = old.join(parts) + old[:10]
    for _ in range(50):
        cuts = [rnd.randrange(len(data)) for _ in range(rnd.randrange(1, 60))]
        assert replaced(StreamReplacer(old, new), data, cuts) == data.replace(old, new)


def regex_oracle(data, pairs):
    """Leftmost match, longest at a shared start, as a regex alternation sorted longest first."""
    table = dict(pairs)
    pattern = re.compile(b"|".join(re.escape(o) for o in sorted(table, key=len, reverse=True)))
    return pattern.sub(lambda m: table[m.group()], data)


ABC = st.binary(min_size=1, max_size=4).map(lambda b: bytes(x % 3 + 97 for x in b))


@given(st.binary(max_size=300).map(lambda b: bytes(x % 3 + 97 for x in b)),
       st.lists(st.tuples(ABC, st.binary(max_size=4)), min_size=1, max_size=4, unique_by=lambda p: p[0]),
       st.lists(st.integers(0, 300), max_size=10))
def test_multi_replacer_equals_the_whole_stream_replacement(data, pairs, cuts):
    want = regex_oracle(data, pairs)
    assert replace_all(data, pairs) == want
    assert replaced(MultiReplacer(pairs), data, cuts) == want
    text = [(o.decode(), n.decode("latin-1")) for o, n in pairs]
    assert replace_all(data.decode(), text) == want.decode("latin-1")


def test_multi_replacer_prefers_the_longest_at_a_shared_start_and_never_rescans_output():
    pairs = [(b"ab", b"1"), (b"abc", b"2"), (b"c", b"ab")]
    r = MultiReplacer(pairs)
    assert replaced(r, b"abcabc ab c", [1, 2, 5]) == b"22 1 ab"
    assert replaced(MultiReplacer([]), b"unchanged", [3]) == b"unchanged"
    with pytest.raises(ValueError):
        MultiReplacer([(b"", b"x")])

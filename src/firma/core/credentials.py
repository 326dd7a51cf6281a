"""Credential brokering (DESIGN §5.7), pure: the `[credentials.NAME]` table, placeholders, and
the sidecar's decisions over request heads and body streams. No I/O (reading a secret is
firma.credsource's part).

The agent sees only a per-run placeholder (`firma-cred-NAME-HEX`) in a variable. The sidecar
swaps it for the secret only in the credential's named header of an inspected request to a host
the credential is bound to, and the whole header value becomes the configured format, so the
agent never chooses where the secret lands. A placeholder anywhere else (the URL, another header,
a header name, a body, any other host) is "stray" and the request is refused. Responses from a
request that carried a secret have the secret replaced by the placeholder.

Strings and bytes: header names and values are `str` as firma.core.http1 gives them (request
heads decoded as UTF-8, response heads as latin-1). Secrets, placeholders and formats are held
to printable ASCII, on which both decodings agree, so the broker compares and writes `str` in
heads and `bytes` in bodies with no ambiguity: `secret.decode("ascii")` is what goes on the wire.
"""

from __future__ import annotations

import re
import shlex
from types import MappingProxyType
from typing import Any, AnyStr, Iterable, Mapping, Sequence

from ..errors import ConfigError, PolicyError
from .policy import HostPattern, parse_pattern
from .record import field, record
from .wire import HEADER_PREFIX

MAX_SECRET = 16 * 1024  # bytes, after one trailing newline is stripped
DEFAULT_HEADER = "Authorization"
DEFAULT_FORMAT = "Bearer {secret}"
SECRET_SLOT = "{secret}"
PLACEHOLDER_PREFIX = "firma-cred-"
MIN_TOKEN_HEX = 32
SOURCE_KINDS = ("env", "file", "command")
KEYS = ("hosts", "env", "header", "format", "source")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP field name (RFC 9110), as http1 parses it
_HEX_TOKEN = re.compile(r"[0-9a-f]{%d,}" % MIN_TOKEN_HEX)
# Printable ASCII and tab: what a header value may carry in both head decodings; CR, LF and NUL
# (header injection) and every other control byte are outside it.
_NOT_PRINTABLE_TEXT = re.compile(r"[^\t\x20-\x7e]")
_NOT_PRINTABLE_BYTES = re.compile(rb"[^\t\x20-\x7e]")
_LINE_BREAK = re.compile(rb"[\r\n\x00]")

# Variables the agent's placeholder may not take over: firma's own, those that decide what a
# process loads, where it sends traffic, or which CAs it trusts. Compared case-insensitively
# (proxy variables are read in both cases; refusing `path` as well costs nothing).
RESERVED_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD",
    "NODE_OPTIONS", "PERL5OPT", "RUBYOPT", "BASH_ENV", "ENV",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO", "PIP_CERT", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT", "JAVA_TOOL_OPTIONS",
})
RESERVED_ENV_PREFIXES = ("FIRMA_", "LD_", "DYLD_", "PYTHON")
RESERVED_ENV_SUFFIXES = ("_PROXY",)  # HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY, NODE_USE_ENV_PROXY…

# Headers that frame, route or upgrade the message, or that firma itself reads or strips: a
# secret there would either change how the request is parsed or never arrive. `Cookie` is
# allowed: a session cookie is a real credential form and does not frame or route anything (the
# whole value becomes the format, so the agent's other cookies in that header are dropped).
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
    "upgrade", "expect",
})
RESERVED_HEADER_PREFIXES = ("proxy-", HEADER_PREFIX)


class CredentialError(ConfigError):
    """A credential's secret, placeholder or source is unusable; never carries the secret."""


@record
class CredentialSpec:
    """One `[credentials.NAME]` table of a trusted config file, validated."""

    name: str
    hosts: tuple[str, ...]  # host pattern texts (firma.core.policy.parse_pattern)
    env: str  # the agent's variable, holding the placeholder
    header: str  # as configured; matched case-insensitively
    format: str  # exactly one "{secret}"
    source_kind: str  # "env" | "file" | "command"
    source_arg: str | tuple[str, ...]  # variable name, absolute path, or argv (absolute program)


@record
class Credential:
    """A credential of one run: its spec, placeholder and secret (never in repr)."""

    spec: CredentialSpec
    placeholder: str
    secret: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def header_value(self) -> bytes:
        """The named header's whole value: the format with the secret in its slot."""
        return self.spec.format.encode("ascii").replace(SECRET_SLOT.encode(), self.secret, 1)

    def header_text(self) -> str:
        """`header_value()` as the `str` a head carries (ASCII, so either decoding)."""
        return self.header_value().decode("ascii")


# ---------------------------------------------------------------------------- config table


def parse_credentials(table: Mapping[str, Any], path: str) -> tuple[CredentialSpec, ...]:
    """`[credentials.NAME]` tables of one config file, validated; one-line ConfigError naming
    the file and the key otherwise."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: 'credentials' must be a table of [credentials.NAME] tables")
    specs = tuple(_spec(name, body, path) for name, body in table.items())
    refuse_shared_env(specs, path)
    return specs


def refuse_shared_env(specs: Iterable[CredentialSpec], where: str) -> None:
    """Two credentials may not hand the agent the same variable (call again after merging files)."""
    seen: dict[str, str] = {}
    for s in specs:
        if s.env in seen:
            raise ConfigError(f"{where}: credentials.{s.name}.env {s.env} is also the variable of "
                              f"credentials.{seen[s.env]}; give each credential its own variable")
        seen[s.env] = s.name


def _spec(name: Any, body: Any, path: str) -> CredentialSpec:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{path}: credential name {name!r} is invalid; use 1-32 of a-z 0-9 _ - starting with a letter or digit")
    where = f"{path}: credentials.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where} must be a table ([credentials.{name}])")
    for key in body:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; known: {', '.join(KEYS)}")
    for key in ("hosts", "env", "source"):
        if key not in body:
            raise ConfigError(f"{where}.{key} is required")
    header = body.get("header", DEFAULT_HEADER)
    fmt = body.get("format", DEFAULT_FORMAT)
    kind, arg = _source(body["source"], where)
    return CredentialSpec(name=name, hosts=_hosts(body["hosts"], where), env=_env(body["env"], where),
                          header=_header(header, where), format=_format(fmt, where), source_kind=kind, source_arg=arg)


def _hosts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(h, str) for h in value):
        raise ConfigError(f"{where}.hosts must be a non-empty list of host patterns, e.g. [\"api.github.com\"]")
    out = []
    for text in value:
        try:
            out.append(parse_pattern(text).text)
        except PolicyError as exc:
            raise ConfigError(f"{where}.hosts: {exc}") from None
    return tuple(out)


def env_refusal(name: str) -> str | None:
    """Why `name` cannot be a credential's variable, or None."""
    if not _ENV_NAME.fullmatch(name):
        return "is not a variable name (letters, digits, _; not starting with a digit)"
    upper = name.upper()
    if upper in RESERVED_ENV or upper.startswith(RESERVED_ENV_PREFIXES) or upper.endswith(RESERVED_ENV_SUFFIXES):
        return "is reserved (firma's own, loader, proxy or CA trust variables)"
    return None


def _env(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}.env must be a string naming the agent's variable, e.g. \"GITHUB_TOKEN\"")
    why = env_refusal(value)
    if why:
        raise ConfigError(f"{where}.env {value!r} {why}; choose another variable name")
    return value


def _header(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ConfigError(f"{where}.header must be an HTTP header name (letters, digits, -), e.g. \"Authorization\"")
    low = value.lower()
    if low in RESERVED_HEADERS or low.startswith(RESERVED_HEADER_PREFIXES):
        raise ConfigError(f"{where}.header {value} frames, routes or is firma's own; choose the header the service "
                          "reads its credential from (Authorization, X-Api-Key, Cookie, …)")
    return value


def _format(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.count(SECRET_SLOT) != 1:
        raise ConfigError(f"{where}.format must be a string with exactly one {SECRET_SLOT}, e.g. \"Bearer {SECRET_SLOT}\"")
    if _NOT_PRINTABLE_TEXT.search(value):
        raise ConfigError(f"{where}.format may hold printable ASCII only (no CR, LF or other control character)")
    return value


def _source(value: Any, where: str) -> tuple[str, str | tuple[str, ...]]:
    hint = "give env:NAME, file:/absolute/path or command:/absolute/program ARGS"
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"{where}.source must be a string; {hint}")
    kind, sep, arg = value.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}.source {value!r} has no known kind; {hint}")
    if kind == "env":
        if not _ENV_NAME.fullmatch(arg):
            raise ConfigError(f"{where}.source env:{arg} does not name a variable; {hint}")
        return kind, arg
    if kind == "file":
        if not arg.startswith("/"):
            raise ConfigError(f"{where}.source file:{arg} is not an absolute path; {hint}")
        return kind, arg
    try:
        argv = tuple(shlex.split(arg))
    except ValueError as exc:
        raise ConfigError(f"{where}.source command: does not split into words ({exc}); fix its quoting") from None
    if not argv or not argv[0].startswith("/"):
        raise ConfigError(f"{where}.source command: the program must be an absolute path; {hint}")
    return kind, argv


# ------------------------------------------------------------------- placeholders, secrets


def placeholder(name: str, token: str) -> str:
    """The value the agent sees: `firma-cred-NAME-TOKEN`; `token` is ≥ 32 lower-case random hex."""
    if not _NAME.fullmatch(name):
        raise CredentialError(f"credential name {name!r} is invalid; use 1-32 of a-z 0-9 _ -")
    if not _HEX_TOKEN.fullmatch(token):
        raise CredentialError(f"[credentials.{name}]: a placeholder token must be at least {MIN_TOKEN_HEX} "
                              "lower-case hex digits; draw it from a random source")
    return f"{PLACEHOLDER_PREFIX}{name}-{token}"


def validate_secret(secret: bytes, name: str) -> bytes:
    """The secret without one trailing newline; refused (never quoted) when it could not travel
    in a header as it is: empty, over 16 KiB, a control byte, non-ASCII, or surrounding blanks."""
    if secret.endswith(b"\r\n"):
        secret = secret[:-2]
    elif secret.endswith(b"\n"):
        secret = secret[:-1]
    where = f"[credentials.{name}]"
    if not secret:
        raise CredentialError(f"{where}: the secret is empty; put the secret in its source")
    if len(secret) > MAX_SECRET:
        raise CredentialError(f"{where}: the secret is longer than {MAX_SECRET} bytes; a header cannot carry it: check its source")
    if _LINE_BREAK.search(secret):
        raise CredentialError(f"{where}: the secret holds a line break or NUL byte (header injection); "
                              "store it on one line with at most one trailing newline")
    bad = _NOT_PRINTABLE_BYTES.search(secret)
    if bad:
        what = "a non-ASCII byte" if bad.group()[0] >= 0x80 else "a control character"
        raise CredentialError(f"{where}: the secret holds {what}; a header carries printable ASCII: store it "
                              "encoded as the service expects (e.g. base64)")
    if secret != secret.strip(b" \t"):
        raise CredentialError(f"{where}: the secret starts or ends with a blank, which HTTP strips; remove it from its source")
    return secret


# -------------------------------------------------------------------------- request heads

Headers = tuple[tuple[str, str], ...]


class Broker:
    """The run's credentials and the decisions the sidecar takes on a request head. Immutable
    after construction; no I/O."""

    def __init__(self, credentials: Iterable[Credential] = ()) -> None:
        self.credentials = tuple(credentials)
        seen: set[str] = set()
        for c in self.credentials:
            if not c.placeholder.startswith(f"{PLACEHOLDER_PREFIX}{c.name}-") or c.name in seen:
                raise CredentialError(f"[credentials.{c.name}]: duplicate credential or a placeholder not made by placeholder()")
            seen.add(c.name)
            if validate_secret(c.secret, c.name) != c.secret:
                raise CredentialError(f"[credentials.{c.name}]: the secret was not passed through validate_secret")
        try:
            self._bindings: tuple[tuple[Credential, tuple[HostPattern, ...]], ...] = tuple(
                (c, tuple(parse_pattern(h) for h in c.spec.hosts)) for c in self.credentials)
        except PolicyError as exc:
            raise CredentialError(f"credential hosts: {exc}") from None
        self._needles = MappingProxyType({c.name: c.placeholder.encode("ascii") for c in self.credentials})
        self._by_name = {c.name: c for c in self.credentials}

    def bound(self, host: str, port: int) -> tuple[Credential, ...]:
        """The credentials whose hosts match `host` (canonical) and `port`."""
        return tuple(c for c, patterns in self._bindings if any(p.matches(host, port) for p in patterns))

    def inject(self, headers: Headers, host: str, port: int) -> tuple[Headers, tuple[str, ...]]:
        """Each header named by a credential bound to host:port that holds that credential's
        placeholder gets the whole configured value instead; other headers are unchanged.
        Returns the headers (same names and order) and the injected credentials' names."""
        creds = self.bound(host, port)
        if not creds:
            return headers, ()
        out: list[tuple[str, str]] = []
        injected: list[str] = []
        for k, v in headers:
            low = k.lower()
            for c in creds:
                if low == c.spec.header.lower() and c.placeholder in v:
                    v = c.header_text()
                    if c.name not in injected:
                        injected.append(c.name)
                    break  # the value is the secret's now: no second credential reads it
            out.append((k, v))
        return tuple(out), tuple(injected)

    def stray(self, host: str, port: int, *, target: str, headers: Headers, after_inject: bool = False) -> str | None:
        """The name of a credential whose placeholder appears where it may not go, else None.

        The strict rule: the only place a placeholder may be is the named header of a credential
        bound to host:port — and only before injection (`after_inject=False`, the head as the
        agent sent it, about to go through `inject`). Anywhere else — the request target, a
        header name, another header, another host — is stray. With `after_inject=True` (the head
        as it will be sent, or a path that never injects) every placeholder is stray. The host
        itself is checked too (a DNS label can carry one): call it with `target=""` and no headers
        for a CONNECT or a TLS server name."""
        if not self.credentials or not _mentions_prefix(host + " " + target, headers):
            return None
        allowed: set[tuple[str, str]] = set()
        if not after_inject:
            allowed = {(c.spec.header.lower(), c.placeholder) for c in self.bound(host, port)}
        for c in self.credentials:
            ph = c.placeholder
            if ph in target or ph in host:
                return c.name
            for k, v in headers:
                if ph in k or (ph in v and (k.lower(), ph) not in allowed):
                    return c.name
        return None

    def needles(self) -> Mapping[str, bytes]:
        """name → placeholder bytes, for scanning request bodies (`NeedleScanner`)."""
        return self._needles

    def response_replacer(self, names: Iterable[str]) -> ResponseReplacer | None:
        """A replacer of the named credentials' secrets by their placeholders, for a response;
        None when `names` is empty."""
        pairs = []
        for n in dict.fromkeys(names):
            if n not in self._by_name:
                raise KeyError(f"no credential named {n!r}")
            c = self._by_name[n]
            pairs.append((c.secret, c.placeholder.encode("ascii")))
        return ResponseReplacer(tuple(pairs)) if pairs else None


def _mentions_prefix(target: str, headers: Headers) -> bool:
    # Every placeholder starts with the prefix: one pass over the head rules most requests out.
    return PLACEHOLDER_PREFIX in target or any(PLACEHOLDER_PREFIX in k or PLACEHOLDER_PREFIX in v for k, v in headers)


# ------------------------------------------------------------------------------- streams


class NeedleScanner:
    """Finds any of `needles` (name → bytes) in a stream fed in chunks. `feed` returns what is
    safe to forward now — everything but the last len(longest needle)-1 bytes, which could begin
    a needle the next chunk completes — and the name of a needle once one is seen; from then on
    nothing more is returned. A needle is never returned whole, nor any byte from its start on.
    Without needles the output is the input, unchanged."""

    def __init__(self, needles: Mapping[str, bytes]) -> None:
        self._needles = tuple((name, bytes(n)) for name, n in needles.items())
        if any(not n for _, n in self._needles):
            raise ValueError("a needle must not be empty")
        self._keep = max((len(n) for _, n in self._needles), default=1) - 1
        self._carry = b""
        self.found: str | None = None

    def feed(self, chunk: bytes) -> tuple[bytes, str | None]:
        if self.found is not None:
            return b"", self.found
        if not self._needles:
            return bytes(chunk), None
        buf = self._carry + chunk
        first, name = -1, None
        for n, needle in self._needles:
            i = buf.find(needle)
            if i >= 0 and (first < 0 or i < first):
                first, name = i, n
        if name is not None:
            self.found, self._carry = name, b""
            return buf[:first], name
        cut = len(buf) - self._keep
        if cut <= 0:
            self._carry = buf
            return b"", None
        self._carry = buf[cut:]
        return buf[:cut], None

    def flush(self) -> bytes:
        """The bytes held back, at the end of the stream (none after a find)."""
        out, self._carry = self._carry, b""
        return b"" if self.found is not None else out


def _replace_scan(buf: AnyStr, olds: Sequence[AnyStr], news: Sequence[AnyStr], limit: int) -> tuple[AnyStr, int]:
    """Replace occurrences in `buf` that start before `limit`, scanning left to right: at each
    position the longest `old` that occurs there (olds sorted longest first), matches never
    overlapping. Returns (output up to the resume point, resume point)."""
    out: list[AnyStr] = []
    pos = 0
    nexts = [buf.find(old) for old in olds]
    while True:
        best, which = -1, -1
        for j, old in enumerate(olds):
            i = nexts[j]
            if 0 <= i < pos:
                i = nexts[j] = buf.find(old, pos)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, j
        if best < 0 or best >= limit:
            break
        out.append(buf[pos:best])
        out.append(news[which])
        pos = best + len(olds[which])
    cut = max(pos, limit)
    out.append(buf[pos:cut])
    return buf[:0].join(out), cut


class MultiReplacer:
    """Replaces each `old` of `pairs` by its `new` in a stream fed in chunks: the output of all
    `feed`s and the `flush` equals `replace_all(whole, pairs)` however the stream is cut. Holds
    back at most len(longest old)-1 bytes."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        table = dict(pairs)
        if any(not old for old in table):
            raise ValueError("an old value must not be empty")
        order = sorted(table, key=len, reverse=True)  # at one position the longest wins
        self._olds = tuple(bytes(o) for o in order)
        self._news = tuple(bytes(table[o]) for o in order)
        self._keep = max((len(o) for o in order), default=1) - 1
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._carry + chunk
        if not self._olds:
            self._carry = b""
            return buf
        # An occurrence starting before `limit` ends within `buf`: decided; later ones may not be.
        limit = len(buf) - self._keep
        if len(self._olds) == 1 and limit > 0:
            old = self._olds[0]
            j = buf.find(old, max(0, limit - len(old) + 1))
            if j < 0 or j >= limit:
                # No occurrence straddles `limit`, so a left-to-right scan is between matches
                # there: bytes.replace on the part before it is the whole stream's answer.
                self._carry = buf[limit:]
                return buf[:limit].replace(old, self._news[0])
        out, cut = _replace_scan(buf, self._olds, self._news, limit)
        self._carry = buf[cut:]
        return out

    def flush(self) -> bytes:
        buf, self._carry = self._carry, b""
        return _replace_scan(buf, self._olds, self._news, len(buf))[0] if self._olds else buf


class StreamReplacer(MultiReplacer):
    """`MultiReplacer` with one pair: the output equals `whole.replace(old, new)`."""

    def __init__(self, old: bytes, new: bytes) -> None:
        super().__init__(((old, new),))


def replace_all(data: AnyStr, pairs: Sequence[tuple[AnyStr, AnyStr]]) -> AnyStr:
    """Every `old` replaced by its `new`, left to right, the longest at a shared start, no
    overlaps (for one pair: `data.replace(old, new)`)."""
    if not pairs:
        return data
    order = sorted(pairs, key=lambda p: len(p[0]), reverse=True)
    if any(not old for old, _ in order):
        raise ValueError("an old value must not be empty")
    out, _ = _replace_scan(data, [o for o, _ in order], [n for _, n in order], len(data))
    return out


class ResponseReplacer:
    """The secrets → placeholders of one response: `whole` for a header value (str, latin-1 as
    http1 decodes a response head), `stream()` a fresh replacer for its body."""

    def __init__(self, pairs: tuple[tuple[bytes, bytes], ...]) -> None:
        self.pairs = pairs
        self._text_pairs = tuple((old.decode("latin-1"), new.decode("latin-1")) for old, new in pairs)

    def __repr__(self) -> str:
        return f"ResponseReplacer({len(self.pairs)} secrets)"

    def whole(self, text: str) -> str:
        return replace_all(text, self._text_pairs)

    def stream(self) -> MultiReplacer:
        return MultiReplacer(self.pairs)


__all__ = [
    "Broker", "Credential", "CredentialError", "CredentialSpec", "MultiReplacer", "NeedleScanner", "ResponseReplacer",
    "StreamReplacer", "env_refusal", "parse_credentials", "placeholder", "refuse_shared_env", "replace_all",
    "validate_secret",
]

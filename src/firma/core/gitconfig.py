"""git config files as data (pure): the entries of one file, and which of them make git run a
program. Used where firma reads a workspace's git config: the protected-path plan (hooksPath and
include paths, DESIGN §5) and the post-run workspace check (code-running keys, DESIGN §13a).

The reader follows git's own grammar closely enough for a file the agent wrote: sections with
quoted subsections (`[remote "origin"]`) and the legacy dotted form (`[remote.origin]`), quoted
values with escapes, backslash-newline continuations, `#`/`;` comments, keys without `=`
(boolean true), case-insensitive section and key names. It never raises: a line it cannot read
is skipped, as git would refuse the whole file (and then run nothing from it)."""

from __future__ import annotations

import re

from .record import record

# Horizontal space only: a header or key never spans lines.
_SECTION = re.compile(r'[ \t\r]*\[[ \t]*([A-Za-z0-9.-]+)[ \t]*(?:"((?:[^"\\\n]|\\.)*)")?[ \t]*\]')
_KEY = re.compile(r"[ \t\r]*([A-Za-z][A-Za-z0-9-]*)[ \t]*(=?)")
_BOOLEANS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0", ""})


@record
class GitEntry:
    section: str  # lower case
    subsection: str | None  # as written (case-sensitive), None when the section has none
    key: str  # lower case
    value: str | None  # None: the key was given without `=` (boolean true)

    @property
    def name(self) -> str:
        """section[.subsection].key, as `git config --list` prints it."""
        if self.subsection is None:
            return f"{self.section}.{self.key}"
        return f"{self.section}.{self.subsection}.{self.key}"


def _value(text: str, i: int) -> tuple[str, int]:
    """The value starting at text[i]: quotes removed, escapes undone, a trailing comment
    dropped, backslash-newline joined; returns (value, index after the logical line)."""
    out: list[str] = []
    quoted = False
    n = len(text)
    pending_space = ""  # unquoted inner whitespace is kept, trailing whitespace is not
    while i < n:
        c = text[i]
        if c == "\n":
            i += 1
            break
        if c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            i += 2
            if nxt == "\n":
                continue  # continuation line
            out.append(pending_space + {"n": "\n", "t": "\t", "b": "\b"}.get(nxt, nxt))
            pending_space = ""
            continue
        i += 1
        if c == '"':
            quoted = not quoted
            out.append(pending_space)
            pending_space = ""
        elif not quoted and c in "#;":
            while i < n and text[i] != "\n":
                i += 1
        elif not quoted and c in " \t\r":
            if out:
                pending_space += c
        else:
            out.append(pending_space + c)
            pending_space = ""
    return "".join(out), i


def _legacy(name: str) -> tuple[str, str | None]:
    """`[section.sub]`: the subsection is lower-cased, as git does for the old syntax."""
    section, dot, sub = name.partition(".")
    return section.lower(), (sub.lower() if dot else None)


def _unescape_subsection(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw)


def entries(text: str) -> tuple[GitEntry, ...]:
    """Every `key = value` of one git config file, in order, with its section."""
    out: list[GitEntry] = []
    section: str | None = None
    subsection: str | None = None
    i, n = (1 if text.startswith("\ufeff") else 0), len(text)
    while i < n:
        # One logical line (a section header may be followed by an entry on the same line).
        m = _SECTION.match(text, i)
        if m:
            if m.group(2) is not None:
                section, subsection = m.group(1).lower(), _unescape_subsection(m.group(2))
            else:
                section, subsection = _legacy(m.group(1))
            i = m.end()
        k = _KEY.match(text, i)
        if k and section is not None:
            key = k.group(1).lower()
            j = k.end()
            if k.group(2):
                value: str | None
                value, i = _value(text, j)
            else:
                rest, i = _value(text, j)
                if rest:  # `key junk`: not an entry git accepts
                    continue
                value = None
            out.append(GitEntry(section, subsection, key, value))
            continue
        nl = text.find("\n", i)
        i = n if nl < 0 else nl + 1
    return tuple(out)


# Keys whose value makes git run a program — on `git status` itself (core.fsmonitor), on other
# common commands (diff, commit, fetch, log), or by reading more config (include paths). The
# subsection pattern: None = the key has none, "*" = any subsection, or both for "?".
_ANY = "?"
_SUB = "*"
_NONE = None
CODE_RUNNING_KEYS: tuple[tuple[str, str | None, str], ...] = (
    ("core", _NONE, "fsmonitor"),
    ("core", _NONE, "hookspath"),
    ("core", _NONE, "sshcommand"),
    ("core", _NONE, "gitproxy"),
    ("core", _NONE, "pager"),
    ("core", _NONE, "editor"),
    ("core", _NONE, "askpass"),
    ("core", _NONE, "alternaterefscommand"),
    ("credential", _ANY, "helper"),
    ("filter", _SUB, "clean"),
    ("filter", _SUB, "smudge"),
    ("filter", _SUB, "process"),
    ("diff", _SUB, "textconv"),
    ("diff", _SUB, "command"),
    ("diff", _NONE, "external"),
    ("merge", _SUB, "driver"),
    ("include", _NONE, "path"),
    ("includeif", _SUB, "path"),
    ("alias", _NONE, "*"),  # only `!cmd` values (a shell command); see runs_code
    ("alias", _SUB, "command"),  # [alias "name"] command = !cmd (git 2.46+ form)
    ("sequence", _NONE, "editor"),
    ("gpg", _NONE, "program"),
    ("gpg", _SUB, "program"),
    ("pager", _NONE, "*"),  # pager.<cmd> = a program (booleans only toggle the default pager)
    ("uploadpack", _NONE, "packobjectshook"),
    ("remote", _SUB, "uploadpack"),
    ("remote", _SUB, "receivepack"),
    ("remote", _SUB, "vcs"),  # runs git-remote-<vcs>
    ("protocol", _SUB, "allow"),  # protocol.ext.allow lets a URL run a command
    ("protocol", _NONE, "allow"),
    ("submodule", _SUB, "update"),  # `!cmd` values run on `git submodule update`
    ("interactive", _NONE, "difffilter"),
    ("difftool", _SUB, "cmd"),
    ("mergetool", _SUB, "cmd"),
    ("browser", _SUB, "cmd"),
    ("man", _SUB, "cmd"),
    ("web", _NONE, "browser"),
)


def _is_boolean(value: str | None) -> bool:
    return value is None or value.strip().lower() in _BOOLEANS


def runs_code(entry: GitEntry) -> bool:
    """Whether this entry makes git run a program (or read more config that may)."""
    sec, sub, key = entry.section, entry.subsection, entry.key
    for s, sub_rule, k in CODE_RUNNING_KEYS:
        if s != sec or (k != "*" and k != key):
            continue
        if sub_rule is _NONE and sub is not None:
            continue
        if sub_rule == _SUB and sub is None:
            continue
        return _value_runs_code(entry)
    return False


def _value_runs_code(entry: GitEntry) -> bool:
    sec, key, value = entry.section, entry.key, entry.value
    if sec == "alias" or (sec == "submodule" and key == "update"):
        return (value or "").lstrip().startswith("!")
    if sec == "protocol":
        # Only the `ext` transport runs a command; other protocols fetch data.
        proto = entry.subsection if entry.subsection is not None else ""
        return proto.lower() == "ext" and (value or "").strip().lower() != "never"
    if sec == "pager" or (sec == "core" and key == "fsmonitor"):
        # A boolean selects git's own pager / the built-in fsmonitor daemon: no foreign program.
        return not _is_boolean(value)
    return bool(value and value.strip())


def code_running(text: str) -> tuple[GitEntry, ...]:
    """The entries of one config file that make git run a program."""
    return tuple(e for e in entries(text) if runs_code(e))


def hooks_paths(found: tuple[GitEntry, ...]) -> tuple[str, ...]:
    """core.hooksPath values (the last one wins in git; every one is returned, conservatively)."""
    return tuple(e.value for e in found if e.section == "core" and e.subsection is None
                 and e.key == "hookspath" and e.value)


def include_paths(found: tuple[GitEntry, ...]) -> tuple[str, ...]:
    """include.path and includeIf.<cond>.path values, as written (relative to the including file)."""
    return tuple(e.value for e in found if e.key == "path" and e.value and (
        (e.section == "include" and e.subsection is None) or (e.section == "includeif" and e.subsection is not None)
    ))


def object_hash_size(found: tuple[GitEntry, ...]) -> int:
    """Bytes of one object id in this repository's index: 32 with extensions.objectFormat=sha256."""
    for e in found:
        if e.section == "extensions" and e.subsection is None and e.key == "objectformat":
            return 32 if (e.value or "").strip().lower() == "sha256" else 20
    return 20

"""The post-run workspace check as data (DESIGN §13a): what a finding is, which names in the
workspace are tool configs that run code later, which keys of an agent's home settings define
commands, how the findings are shown and what they do to the exit status. Pure; the scanner
that measures the workspace is firma.run.workspace_check."""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..errors import ConfigError
from .bwrap_plan import GIT_DIR, WORKSPACE_PROTECTED
from .record import record

# [run].on_workspace_findings
FAIL = "fail"
WARN = "warn"
ON_FINDINGS_MODES = (FAIL, WARN)
FINDINGS_EXIT_STATUS = 3  # DESIGN §13

CHECK_NAME = "workspace_findings"

# Kinds of finding, each with what the user does about it.
GIT_CONFIG = "git-config"
GIT_HOOK = "git-hook"
GIT_INDEX = "git-index"
TOOL_CONFIG = "tool-config"
SETUID = "setuid"
WORLD_WRITABLE = "world-writable"
CAPABILITY = "capability"
HOME_CONFIG = "home-config"
INCOMPLETE = "scan-incomplete"

# Workspace names that configure a tool which runs a program the next time the user runs it
# (cargo, npm, direnv, editors, agents...): the protected list minus its git entries, which the
# check reads as git does. Matched at any depth: cargo, direnv and editors read nested ones too.
TOOL_CONFIG_NAMES = frozenset(
    p for p in WORKSPACE_PROTECTED if "/" not in p and not p.startswith(GIT_DIR + "/")
)

# Keys of agent settings (JSON or TOML, under a profile's writable home paths) whose values are
# commands the agent's next run on the host executes: Claude Code hooks, MCP servers, statusLine
# and apiKeyHelper; Codex mcp_servers and notify.
COMMAND_KEYS = frozenset({"hooks", "mcpServers", "mcp_servers", "statusLine", "apiKeyHelper", "notify"})
_MAX_DEPTH = 12


@record
class Finding:
    kind: str
    path: str
    detail: str
    remedy: str

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail, "remedy": self.remedy}


def parse_on_findings(value: object, where: str) -> str:
    if value not in ON_FINDINGS_MODES:
        raise ConfigError(f"{where} must be \"fail\" or \"warn\", not {value!r}")
    return str(value)


def exit_status(agent_status: int, findings: Iterable[Finding], mode: str) -> int:
    """The run's status after the check: 3 replaces a clean 0 in "fail" mode; a non-zero agent
    status (its own failure or a signal) is always kept."""
    if agent_status == 0 and mode == FAIL and any(True for _ in findings):
        return FINDINGS_EXIT_STATUS
    return agent_status


def check_detail(findings: tuple[Finding, ...], scanned: int) -> str:
    if not findings:
        return f"nothing left behind that runs code later ({scanned} workspace entries checked)"
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return f"{len(findings)} finding(s): {summary} ({scanned} workspace entries checked)"


def printable(text: str) -> str:
    """Agent-chosen names reach the user's terminal: control characters (escape sequences,
    newlines that would forge lines of the block) are shown escaped, never interpreted."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(findings: tuple[Finding, ...], mode: str) -> str:
    """The one block printed on stderr after the run; empty when nothing was found."""
    if not findings:
        return ""
    consequence = (
        f"exit status {FINDINGS_EXIT_STATUS} unless the agent failed"
        if mode == FAIL
        else "on_workspace_findings = \"warn\": the exit status is the agent's"
    )
    lines = [
        f"firma: the agent left {len(findings)} thing(s) that would run code the next time you use "
        f"git or the tool; nothing was run ({consequence}):"
    ]
    for f in findings:
        lines.append(f"  [{f.kind}] {printable(f.path)}: {printable(f.detail)} -- remove: {printable(f.remedy)}")
    return "\n".join(lines) + "\n"


def command_definitions(text: str, fmt: str) -> frozenset[tuple[str, str]] | None:
    """(key path, value as canonical JSON) of every command-defining entry in one settings file:
    each child of a COMMAND_KEYS table (one hook event, one MCP server) or the value itself.
    None when the file does not parse (the tool reading it would fail too)."""
    doc: Any
    try:
        if fmt == "toml":
            import tomllib  # noqa: PLC0415 - only for the rare changed TOML settings file

            doc = tomllib.loads(text)
        else:
            doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    found: set[tuple[str, str]] = set()
    _collect(doc, "", found, 0)
    return frozenset(found)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _collect(node: Any, at: str, found: set[tuple[str, str]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{at}.{key}" if at else str(key)
            if key in COMMAND_KEYS:
                if isinstance(value, dict) and value:
                    found.update((f"{path}.{k}", _canon(v)) for k, v in value.items())
                elif value not in (None, "", [], {}):
                    found.add((path, _canon(value)))
            else:
                _collect(value, path, found, depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, f"{at}[{i}]", found, depth + 1)


def home_findings(path: str, before: str | None, after: str, fmt: str) -> tuple[Finding, ...]:
    """Command definitions in `after` that `before` (the file at launch, None if absent) lacked."""
    now = command_definitions(after, fmt)
    if not now:
        return ()
    old = command_definitions(before, fmt) if before is not None else None
    new = sorted(now - (old or frozenset()))
    return tuple(
        Finding(HOME_CONFIG, path, f"{key} defines a command (new since launch)",
                f"delete the {key} entry from {path}, or restore the file")
        for key, _ in new
    )


def json_list(findings: tuple[Finding, ...]) -> list[dict[str, str]]:
    return [f.as_json() for f in findings]

"""The three built-in profiles (DESIGN §2): pure data."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from ..errors import ConfigError
from .record import record, field

COMMON_PASSTHROUGH = ("HOME", "PATH", "TERM", "LANG")
# Home paths every profile hides: keys and the well-known credential stores of git, gh, npm, pip,
# cargo, docker, the cloud CLIs, kube and terraform, and shell and REPL histories (they hold
# pasted tokens). A path that does not exist is not masked (nothing to read), and home outside the
# workspace is read-only inside, so none can be created. docs/DESIGN.md §2 lists them.
COMMON_MASKED = (
    ".ssh", ".gnupg", ".netrc", ".password-store",
    ".git-credentials", ".config/git/credentials", ".config/gh", ".config/hub",
    ".npmrc", ".yarnrc", ".yarnrc.yml", ".pypirc", ".cargo/credentials", ".cargo/credentials.toml",
    ".gem/credentials", ".docker", ".aws", ".azure", ".config/gcloud", ".oci", ".config/doctl",
    ".kube", ".terraform.d/credentials.tfrc.json", ".terraformrc", ".vault-token", ".pgpass",
    ".my.cnf", ".s3cfg", ".boto",
    ".bash_history", ".zsh_history", ".zhistory", ".history", ".sh_history",
    ".local/share/fish/fish_history", ".python_history", ".node_repl_history", ".psql_history",
    ".mysql_history", ".sqlite_history", ".lesshst",
)


@record
class Profile:
    name: str
    env_passthrough: tuple[str, ...] = COMMON_PASSTHROUGH
    env_set: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    allow_hosts: tuple[str, ...] = ()
    mask_home_paths: tuple[str, ...] = COMMON_MASKED
    writable_home_paths: tuple[str, ...] = ()


BUILTIN: Mapping[str, Profile] = MappingProxyType(
    {
        "generic": Profile("generic"),
        "claude-code": Profile(
            "claude-code",
            env_passthrough=COMMON_PASSTHROUGH
            + ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"),
            # The API, feature flags, and sign-in / token refresh of subscription logins (claude.ai
            # OAuth, the console). Telemetry and error reports (sentry.io) and the auto-updater's
            # downloads are not allowed: the run summary names them if the user wants them.
            allow_hosts=("api.anthropic.com", "statsig.anthropic.com", "claude.ai", "platform.claude.com",
                         "console.anthropic.com"),
            # The sandbox's root is read-only: an update could not be installed, only downloaded.
            env_set=MappingProxyType({"DISABLE_AUTOUPDATER": "1"}),
            writable_home_paths=(".claude", ".claude.json"),
        ),
        "codex": Profile(
            "codex",
            env_passthrough=COMMON_PASSTHROUGH + ("OPENAI_API_KEY", "CODEX_HOME"),
            allow_hosts=("api.openai.com", "chatgpt.com"),
            writable_home_paths=(".codex",),
        ),
    }
)
ALIASES: Mapping[str, str] = MappingProxyType({"claude": "claude-code"})


def canonical_name(name: str) -> str | None:
    """The profile a name or alias refers to, or None."""
    name = name.strip()
    if name in BUILTIN:
        return name
    return ALIASES.get(name)


def resolve(name: str) -> Profile:
    canon = canonical_name(name)
    if canon is None:
        raise ConfigError(
            f"unknown profile '{name}'; supported profiles: generic, claude-code, codex"
        )
    return BUILTIN[canon]


def choose_profile_name(cli: str | None, config: str | None, command: str | None) -> str:
    """`--profile` → `[run].profile` → the command's basename if it names a profile → generic."""
    for explicit in (cli, config):
        if explicit is not None:
            return resolve(explicit).name
    if command:
        base = command.rstrip("/").rsplit("/", 1)[-1]
        canon = canonical_name(base)
        if canon is not None:
            return canon
    return "generic"

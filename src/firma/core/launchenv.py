"""The launch environment, built from empty (DESIGN §11). The host environment is never inherited:
only names a profile passes through are copied. Pure."""

from __future__ import annotations

from typing import Iterable, Mapping

from .model import Identity, IdentityMode, frozen_map
from . import settings as env_names

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
SANDBOX_USER_NAME = "firma-user"
# Never handed to an agent whatever a profile or config says.
FORBIDDEN = frozenset({env_names.CAPABILITY_TOKEN})


def base_env(
    *,
    host_environ: Mapping[str, str],
    passthrough: Iterable[str],
    env_set: Mapping[str, str],
    identity: Identity,
    identity_mode: IdentityMode,
) -> Mapping[str, str]:
    """Everything except the proxy variables (their address depends on routing)."""
    env: dict[str, str] = {}
    for name in passthrough:
        if name in host_environ:
            env[name] = host_environ[name]
    env.update(env_set)
    if identity_mode is IdentityMode.SANDBOX_USER:
        env["USER"] = env["LOGNAME"] = SANDBOX_USER_NAME
    env.update(
        {
            env_names.RUN_SANDBOX_ID: identity.sandbox_id,
            env_names.RUN_SESSION_ID: identity.session_id,
            env_names.RUN_PROFILE: identity.profile,
            env_names.AGENT_ID: identity.agent_id,
        }
    )
    for name in FORBIDDEN:
        env.pop(name, None)
    return frozen_map(env)


def runtime_proxy_env(proxy_url: str, base: Mapping[str, str]) -> dict[str, str]:
    """Variables runtimes read instead of HTTP_PROXY (docs/runtimes.md): Node ≥ 24's opt-in to the
    proxy variables, and the JVM's proxy properties, appended to a JAVA_TOOL_OPTIONS the user set.
    Clients that read none of these still work on the bwrap backend (transparent egress)."""
    rest = proxy_url.split("://", 1)[-1].rsplit("@", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    out = {"NODE_USE_ENV_PROXY": "1"}
    if host and port.isdigit() and "@" not in proxy_url:  # the JVM properties carry no credential
        props = (f"-Dhttp.proxyHost={host} -Dhttp.proxyPort={port} -Dhttps.proxyHost={host} "
                 f"-Dhttps.proxyPort={port} -Dhttp.nonProxyHosts=")
        user = base.get("JAVA_TOOL_OPTIONS", "").strip()
        out["JAVA_TOOL_OPTIONS"] = f"{user} {props}".strip()
    return out


def with_proxy(
    base: Mapping[str, str],
    proxy_url: str,
    *,
    ca_bundle: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Mapping[str, str]:
    """Add the proxy variables (both cases), empty NO_PROXY, CA trust when a sidecar CA exists."""
    env = dict(base)
    for name in PROXY_VARS:
        env[name] = proxy_url
    for name in NO_PROXY_VARS:
        env[name] = ""
    env.update(runtime_proxy_env(proxy_url, base))
    if ca_bundle:
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            env[name] = ca_bundle
    env.update(extra or {})
    return frozen_map(env)

"""Which TLS destinations the embedded sidecar terminates (DESIGN §5.7). Pure.

A destination is inspected when the user names it (`[run].inspect`, `--inspect`), when a
credential is bound to it, or when the Cedar policy decides on what only a request shows
(method, path, the request context, or `http.request` alone) for it; `[run].no_inspect` wins
over all three (certificate-pinned clients). Everything else is tunnelled as before."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from .hostcanon import HostError, canon_host
from .record import record

# Request-level attributes: a rule on one of them cannot be decided from a tunnel.
_REQUEST_ATTRS = frozenset({"method", "path"})


@record
class HostGlob:
    """A host name pattern: exact, `*.suffix` (subdomains only, as allow_hosts), or a Cedar `like`
    pattern (`*` any run of characters)."""

    text: str
    regex: str

    def matches(self, host: str) -> bool:
        return re.fullmatch(self.regex, host) is not None


def name_glob(text: str, what: str) -> HostGlob:
    """`api.github.com` or `*.anthropic.com` (a port, if given, is not part of the choice)."""
    raw = text.strip().lower()
    wildcard = raw.startswith("*.")
    name = raw[2:] if wildcard else raw
    host, port = name, ""
    if name.startswith("[") and "]:" in name:
        host, port = name.rsplit(":", 1)
    elif name.count(":") == 1:
        host, port = name.split(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{what} entry {text!r}: the port must be a number from 1 to 65535")
    if "*" in host:
        raise ConfigError(f"{what} entry {text!r}: '*' only as a whole leading label ('*.example.com')")
    try:
        canon = canon_host(host).host
    except HostError as exc:
        raise ConfigError(f"{what} entry {text!r}: {exc}") from None
    regex = (r"(?:[^.]+\.)+" if wildcard else "") + re.escape(canon)
    return HostGlob(raw, regex)


def like_glob(pattern: str) -> HostGlob:
    """A Cedar `like` pattern over the host (from the policy's JSON form)."""
    return HostGlob(pattern, ".*".join(re.escape(part) for part in pattern.split("*")))


@record
class PolicyHosts:
    """What the Cedar policy decides per request: for these hosts, or for every host."""

    hosts: tuple[HostGlob, ...] = ()
    any_host: bool = False


@record
class InspectionRules:
    inspect: tuple[HostGlob, ...] = ()
    no_inspect: tuple[HostGlob, ...] = ()
    credential_hosts: tuple[tuple[str, HostGlob], ...] = ()  # (credential name, host)
    policy: PolicyHosts = PolicyHosts()

    @property
    def active(self) -> bool:
        return bool(self.inspect or self.credential_hosts or self.policy.hosts or self.policy.any_host)

    def why(self, host: str) -> str | None:
        """Why `host` is inspected ("inspect", "credential NAME", "policy"), None when it is not."""
        if any(g.matches(host) for g in self.no_inspect):
            return None
        if any(g.matches(host) for g in self.inspect):
            return "inspect"
        for name, g in self.credential_hosts:
            if g.matches(host):
                return f"credential {name}"
        if self.policy.any_host or any(g.matches(host) for g in self.policy.hosts):
            return "policy"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "inspect": [g.text for g in self.inspect],
            "no_inspect": [g.text for g in self.no_inspect],
            "credential_hosts": [f"{n}: {g.text}" for n, g in self.credential_hosts],
            "policy_hosts": ["*"] if self.policy.any_host else [g.text for g in self.policy.hosts],
        }


def rules(inspect: Iterable[str], no_inspect: Iterable[str], credential_hosts: Iterable[tuple[str, str]],
          policy: PolicyHosts) -> InspectionRules:
    return InspectionRules(
        inspect=tuple(name_glob(t, "inspect") for t in dict.fromkeys(inspect)),
        no_inspect=tuple(name_glob(t, "no_inspect") for t in dict.fromkeys(no_inspect)),
        credential_hosts=tuple((n, name_glob(t, f"credentials.{n}.hosts")) for n, t in credential_hosts),
        policy=policy,
    )


# --- the Cedar policy's JSON form (cedarpy.policies_to_json_str) -----------------------------------


def policy_hosts(est: Mapping[str, Any]) -> PolicyHosts:
    """The hosts for which some policy looks at the request itself. A policy that does and names
    no host (or names it only under a negation) counts for every host."""
    hosts: list[HostGlob] = []
    for policy in (est.get("staticPolicies") or {}).values():
        if not _request_level(policy):
            continue
        found = _policy_host_literals(policy)
        if found is None:
            return PolicyHosts(any_host=True)
        hosts.extend(found)
    return PolicyHosts(hosts=tuple(dict.fromkeys(hosts)))


def _request_level(policy: Mapping[str, Any]) -> bool:
    action = policy.get("action") or {}
    entities = [action["entity"]] if "entity" in action else list(action.get("entities") or [])
    if entities and all(isinstance(e, dict) and e.get("id") == "http.request" for e in entities):
        return True
    return any(_mentions_request(c.get("body")) for c in policy.get("conditions") or ())


_CONNECT_ATTRS = frozenset({"host", "port"})


def _mentions_request(node: Any) -> bool:
    """Whether a condition may depend on what only a request shows. Conservative: the action
    tested in a condition, the context, or `resource` used any way but `.host` / `.port` count."""
    if isinstance(node, dict):
        for op in (".", "has"):
            arg = node.get(op)
            if isinstance(arg, dict) and arg.get("left") == {"Var": "resource"}:
                if arg.get("attr") not in _CONNECT_ATTRS:
                    return True
                return False
        if node.get("Var") in ("context", "action", "resource"):
            return True
        return any(_mentions_request(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_request(v) for v in node)
    return False


_HOST = {".": {"left": {"Var": "resource"}, "attr": "host"}}


def _policy_host_literals(policy: Mapping[str, Any]) -> list[HostGlob] | None:
    """Host names a policy applies only to: its scope's resource, or what one of its `when`
    conditions implies `resource.host` is (==, like, a set's contains, through && and through
    || and if-then-else whose every branch says so). None when nothing restricts it: then it
    counts for every host (a host named under a negation, `unless`, or beside an `||` with
    another kind of test restricts nothing)."""
    scope = policy.get("resource") or {}
    if scope.get("op") == "==" and isinstance(scope.get("entity"), dict):
        rid = str(scope["entity"].get("id", ""))
        host = rid.rsplit(":", 1)[0] if ":" in rid else rid
        if host:
            return [like_glob(host.strip("[]"))]
    for cond in policy.get("conditions") or ():
        if cond.get("kind") == "when":
            found = _implied_hosts(cond.get("body"))
            if found is not None:
                return found
    return None


def _implied_hosts(node: Any) -> list[HostGlob] | None:
    """Hosts that `node` being true implies `resource.host` is one of; None when it implies none."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    ((op, arg),) = node.items()
    if not isinstance(arg, dict):
        return None
    if op == "==" and _HOST in (arg.get("left"), arg.get("right")):
        other = arg.get("right") if arg.get("left") == _HOST else arg.get("left")
        value = other.get("Value") if isinstance(other, dict) else None
        return [like_glob(value.lower())] if isinstance(value, str) else None
    if op == "like" and arg.get("left") == _HOST:
        return [like_glob(_like_text(arg.get("pattern")).lower())]
    if op == "contains" and arg.get("right") == _HOST:
        values = (arg.get("left") or {}).get("Set") if isinstance(arg.get("left"), dict) else None
        names = [v.get("Value") for v in values or () if isinstance(v, dict)]
        if values and len(names) == len(values) and all(isinstance(n, str) for n in names):
            return [like_glob(str(n).lower()) for n in names]
        return None
    if op == "&&":
        left = _implied_hosts(arg.get("left"))
        return left if left is not None else _implied_hosts(arg.get("right"))
    if op == "||":
        left, right = _implied_hosts(arg.get("left")), _implied_hosts(arg.get("right"))
        return None if left is None or right is None else left + right
    if op == "if-then-else":
        cond = _implied_hosts(arg.get("if"))
        then = cond if cond is not None else _implied_hosts(arg.get("then"))
        other = _implied_hosts(arg.get("else"))
        return None if then is None or other is None else then + other
    return None


def _like_text(pattern: Any) -> str:
    parts: list[str] = []
    for p in pattern or ():
        if p == "Wildcard":
            parts.append("*")
        elif isinstance(p, dict) and "Literal" in p:
            parts.append(str(p["Literal"]))
    return "".join(parts)

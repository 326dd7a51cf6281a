"""Policy decisions (DESIGN §9): default deny; allow_hosts patterns and Cedar (cedarpy), any
Cedar `forbid` wins. Pure apart from cedarpy evaluation; decide on canonical names only."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

from ..errors import PolicyError
from .hostcanon import HostError, canon_host
from .inspection import PolicyHosts, policy_hosts
from .record import field, record

DEFAULT_PORTS = frozenset({80, 443})
_PATH_ATTR = re.compile(r"\.\s*path\b|\[\s*\"path\"\s*\]")
HTTP_REQUEST = "http.request"
NETWORK_CONNECT = "network.connect"


@record
class HostPattern:
    host: str  # canonical host, or the suffix after "*." for wildcards
    wildcard: bool
    port: int | None  # None: default ports 80/443
    text: str

    def matches(self, host: str, port: int) -> bool:
        if self.port is None:
            if port not in DEFAULT_PORTS:
                return False
        elif port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)  # subdomains only, never the apex
        return host == self.host

    def is_exact(self, host: str, port: int) -> bool:
        """host:port named exactly (no wildcard, explicit port): may reach non-public addresses."""
        return not self.wildcard and self.port == port and self.host == host


def parse_pattern(text: str) -> HostPattern:
    raw = text.strip()
    if not raw:
        raise PolicyError("empty allow-host pattern; remove it or give HOST[:PORT]")
    port: int | None = None
    hostpart = raw
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise PolicyError(f"invalid allow-host pattern {text!r}: unterminated IPv6 literal")
        hostpart, rest = raw[: end + 1], raw[end + 1 :]
        portpart = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif raw.count(":") == 1:
        hostpart, portpart = raw.split(":")
    elif raw.count(":") > 1:
        hostpart, portpart = "[" + raw + "]", None
    else:
        portpart = None
    if portpart is not None:
        if not (portpart.isascii() and portpart.isdigit() and 1 <= int(portpart) <= 65535):
            raise PolicyError(f"invalid allow-host pattern {text!r}: port must be 1-65535")
        port = int(portpart)
    wildcard = hostpart.startswith("*.")
    if wildcard:
        hostpart = hostpart[2:]
    if "*" in hostpart:
        raise PolicyError(f"invalid allow-host pattern {text!r}: '*' only as a whole leading label ('*.example.com')")
    try:
        canon = canon_host(hostpart)
    except HostError as exc:
        raise PolicyError(f"invalid allow-host pattern {text!r}: {exc}") from None
    if wildcard and (canon.is_ip or canon.host.count(".") < 1):
        raise PolicyError(f"invalid allow-host pattern {text!r}: a wildcard needs a registrable domain ('*.example.com', not '*.com')")
    return HostPattern(canon.host, wildcard, port, raw)


@record
class Request:
    action: str  # HTTP_REQUEST | NETWORK_CONNECT
    host: str  # canonical
    port: int
    method: str
    path: str  # without query string
    agent_id: str = ""
    # Cedar's `context` (DESIGN §5.7): what the sidecar saw of the request; see `request_context`.
    context: Mapping[str, Any] = field(default_factory=dict)


def request_context(*, inspected: bool, scheme: str, query_params: tuple[str, ...] = (), content_type: str = "",
                    content_length: int = -1) -> dict[str, Any]:
    """Every key on every request, so a rule that reads one never fails to evaluate (an erroring
    forbid would otherwise be skipped). Query parameter names only, never their values."""
    return {"inspected": inspected, "scheme": scheme, "query_params": list(query_params),
            "content_type": content_type, "content_length": content_length}


@record
class Decision:
    allowed: bool
    reason: str  # "" when allowed; a code like `host_not_allowed`, `policy_forbid`
    detail: str
    exact: bool  # an allow_hosts rule names this host:port exactly


class Policy:
    """Immutable after construction; `decide` is safe to call from any task."""

    def __init__(self, allow_hosts: tuple[str, ...] | list[str] = (), cedar_text: str | None = None, *, source: str = "") -> None:
        self.patterns = tuple(parse_pattern(p) for p in allow_hosts)
        self._cedar = None
        if cedar_text is not None:
            import cedarpy  # noqa: PLC0415 - cedarpy loads only with a Cedar policy (launch latency)

            if not cedar_text.strip():
                raise PolicyError(f"Cedar policy {source or '(inline)'} is empty; write at least one permit or forbid")
            try:
                self._cedar = cedarpy.PolicySet.from_str(cedar_text)
            except Exception as exc:  # noqa: BLE001 - cedarpy raises ValueError subclasses
                raise PolicyError(f"Cedar policy {source or '(inline)'} does not parse: {exc}") from None
            if "policies" in repr(self._cedar) and "<0 policies>" in repr(self._cedar):
                raise PolicyError(f"Cedar policy {source or '(inline)'} holds no policies")
        # Whether any rule looks at the request path: then ambiguous spellings of a path are refused
        # and tunnels that would carry requests past those rules are too (DESIGN §9).
        self.has_path_rules = cedar_text is not None and bool(_PATH_ATTR.search(cedar_text))
        self._cedar_text = cedar_text
        h = hashlib.sha256()
        for p in sorted(x.text for x in self.patterns):
            h.update(p.encode() + b"\n")
        h.update(b"\0" + (cedar_text or "").encode())
        self.version = h.hexdigest()[:16]

    @classmethod
    def load(cls, allow_hosts, policy_path: str | None) -> "Policy":
        text = None
        if policy_path:
            try:
                with open(policy_path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise PolicyError(f"cannot read Cedar policy {policy_path}: {exc}; fix --policy") from None
        return cls(tuple(allow_hosts), text, source=policy_path or "")

    def is_exact(self, host: str, port: int) -> bool:
        return any(p.is_exact(host, port) for p in self.patterns)

    @property
    def has_cedar(self) -> bool:
        return self._cedar is not None

    def request_hosts(self) -> PolicyHosts:
        """The hosts for which a Cedar rule decides on the request itself (method, path,
        context): inspected automatically (DESIGN §5.7)."""
        if self._cedar_text is None:
            return PolicyHosts()
        import cedarpy  # noqa: PLC0415 - cedarpy loads only with a Cedar policy (launch latency)

        return policy_hosts(json.loads(cedarpy.policies_to_json_str(self._cedar_text)))

    def could_allow(self, host: str, ports: tuple[int, ...], agent_id: str) -> bool:
        """Some connection to `host` on one of `ports` (the planted ones) might be allowed: the
        DNS stub answers the name with a synthetic address (DESIGN §5.4); the connection is
        decided on its own when it comes. With a Cedar policy, a `network.connect` or a `GET /`
        it permits on one of the ports counts, as does a rule that looks at the path (decided
        per request)."""
        if any(p.matches(host, port) for p in self.patterns for port in ports):
            return True
        if self._cedar is None:
            return False
        if self.has_path_rules:
            return True
        for port in ports:
            for action, method, path in ((NETWORK_CONNECT, "CONNECT", ""), (HTTP_REQUEST, "GET", "/")):
                if self.decide(Request(action, host, port, method, path, agent_id)).allowed:
                    return True
        return False

    def decide(self, req: Request) -> Decision:
        host_ok = any(p.matches(req.host, req.port) for p in self.patterns)
        exact = self.is_exact(req.host, req.port)
        if self._cedar is not None:
            import cedarpy  # noqa: PLC0415 - cedarpy loads only with a Cedar policy (launch latency)

            entities = [
                {
                    "uid": {"type": "Resource", "id": f"{req.host}:{req.port}"},
                    "attrs": {"host": req.host, "port": req.port, "method": req.method, "path": req.path},
                    "parents": [],
                }
            ]
            try:
                result = cedarpy.is_authorized(
                    {
                        "principal": {"type": "Agent", "id": req.agent_id or "unknown"},
                        "action": {"type": "Action", "id": req.action},
                        "resource": {"type": "Resource", "id": f"{req.host}:{req.port}"},
                        "context": dict(req.context) or request_context(inspected=False, scheme="connect"),
                    },
                    self._cedar,
                    entities,
                )
            except Exception as exc:  # noqa: BLE001 - an evaluation failure denies
                return Decision(False, "policy_error", f"Cedar evaluation failed: {exc}", exact)
            if result.diagnostics.errors:
                # A rule that failed to evaluate is skipped by Cedar: a failing forbid would let
                # the request through. Fail closed instead.
                return Decision(False, "policy_error", "Cedar evaluation error", exact)
            if result.allowed:
                return Decision(True, "", "permitted by Cedar policy", exact)
            if result.diagnostics.reasons:  # a forbid matched: it wins over allow_hosts
                return Decision(False, "policy_forbid", "forbidden by Cedar policy " + ",".join(result.diagnostics.reasons), exact)
        if host_ok:
            return Decision(True, "", "allowed by allow_hosts", exact)
        return Decision(False, "host_not_allowed", f"{req.host}:{req.port} is not in the allow list", exact)

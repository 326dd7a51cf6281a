"""firma's own wire format between the bridge and the sidecar, named once (pure): the attribution
headers (ref names) and their mapping to and from an identity, the report the bridge sends for a
malformed agent request, and the sidecar's deny response."""

from __future__ import annotations

import json

from .record import record

HEADER_PREFIX = "x-firma-"
SANDBOX_ID = "x-firma-sandbox-id"
SESSION_ID = "x-firma-session-id"
PROFILE = "x-firma-profile"
AGENT = "x-firma-agent"
USER = "x-firma-user"
ATTRIBUTION_HEADERS = (SANDBOX_ID, SESSION_ID, PROFILE, AGENT, USER)

REPORT_METHOD = "FIRMA-REPORT"  # bridge → sidecar: a malformed agent request to audit
REPORT_REASON = "x-firma-report-reason"
DENY_REASON = "x-firma-deny-reason"  # on every deny response: the audit reason

_MAX_ATTRIBUTION = 128  # characters of one attribution value the sidecar records


@record
class Attribution:
    """Who a request is from, as the sidecar reads it off the trusted attribution headers."""

    sandbox_id: str = ""
    session_id: str = ""
    agent_id: str = ""
    profile: str = ""


def attribution_headers(*, sandbox_id: str, session_id: str, profile: str, agent_id: str, user: str) -> dict[str, str]:
    """The trusted attribution headers for an identity, sorted by name."""
    return dict(
        sorted({AGENT: agent_id, PROFILE: profile, SANDBOX_ID: sandbox_id, SESSION_ID: session_id, USER: user}.items())
    )


def attribution_of(get) -> Attribution:
    """The attribution a request carries; `get(name)` returns the last value of a header or None."""

    def last(name: str) -> str:
        v = get(name)
        return v[:_MAX_ATTRIBUTION] if v else ""

    return Attribution(last(SANDBOX_ID), last(SESSION_ID), last(AGENT), last(PROFILE))


_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    413: "Payload Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def deny_body(reason: str, detail: str) -> bytes:
    return json.dumps({"denied": True, "reason": reason, "detail": detail}).encode()


def deny_response(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 deny response with a JSON body naming the reason; the connection closes."""
    body = deny_body(reason, detail)
    text = _STATUS_TEXT.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{DENY_REASON}: {reason}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body

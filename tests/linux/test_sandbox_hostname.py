"""The sandbox's own hostname resolves from its /etc/hosts, so looking it up (git does on every
run) sends no DNS query: the audit shows none for it. Control: a name that is not in the file does
reach the DNS stub and is audited as a refused query."""

from __future__ import annotations

import json

import pytest

from firma.core.bwrap_plan import SANDBOX_HOSTNAME
from linux_support import base_env, require_tools, run_firma

pytestmark = pytest.mark.confinement


@pytest.fixture(autouse=True)
def _tools():
    require_tools()


def test_the_sandbox_hostname_resolves_without_a_dns_query(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    control = "not-in-hosts.firma-test.invalid"
    script = f"hostname; getent hosts $(hostname) >/dev/null && echo self=ok || echo self=fail; getent hosts {control} || echo control=unresolved"
    p = run_firma(["run", "--", "sh", "-c", script], cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    out = p.stdout.split()
    assert out == [SANDBOX_HOSTNAME, "self=ok", "control=unresolved"], p.stdout
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    queried = [e["resource"] for e in events if e.get("action") == "dns.query"]
    assert any(r.startswith(control) for r in queried), queried  # control: a lookup reaches the stub
    assert not any(r.startswith(SANDBOX_HOSTNAME) for r in queried), queried

"""HTTPS inspection for an unprivileged caller (DESIGN §5.7): the same terminated, decided and
verified relay as for root, with firma's CA made in that user's own state root (owned by the
user, key 0600) and never visible inside. Control: a host that is not inspected is tunnelled and
the client sees the upstream's own certificate."""

from __future__ import annotations

import json
import os
import stat

import pytest
import trustme

from linux_support import HERE, require_tools
from tls_upstream import TlsUpstream
from unprivileged_support import PY, make_install, remove_install

pytestmark = [pytest.mark.confinement, pytest.mark.unprivileged]


@pytest.fixture(scope="module")
def install():
    require_tools()
    inst = make_install("firma-unpriv-inspect-", extra_tree=HERE)
    yield inst
    remove_install(inst)


def test_an_unprivileged_callers_https_is_inspected_with_its_own_ca(install):
    import subprocess

    u = install.user
    ca = trustme.CA()
    up = TlsUpstream(ca, ("api.example.test", "plain.example.test"))
    try:
        ws = install.root / "ws"
        ws.mkdir()
        os.chown(ws, u.pw_uid, u.pw_gid)
        bundle = install.root / "test-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        os.chmod(bundle, 0o644)
        state = install.root / "state"
        state.mkdir(mode=0o700)
        os.chown(state, u.pw_uid, u.pw_gid)
        env = install.env(SSL_CERT_FILE=str(bundle), FIRMA_STATE_DIR=str(state),
                          FIRMA_TEST_RESOLVE=json.dumps({"api.example.test": ["127.0.0.1"], "plain.example.test": ["127.0.0.1"]}))
        key = state / "ca" / "ca.key"
        script = "".join(
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' https://{h}.example.test:{up.port}/{h} > {h}.code 2>&1; "
            f"openssl s_client -connect {h}.example.test:{up.port} -proxy 127.0.0.1:18080 -servername {h}.example.test "
            f"</dev/null 2>/dev/null | openssl x509 -noout -issuer > {h}.issuer; "
            for h in ("api", "plain")) + f"cat {key} > key.out 2> key.err; true"
        drive = str(install.root / "tests" / "linux_drive.py")
        p = subprocess.run(install.argv(PY, drive, "run", "--quiet", "--inspect", "api.example.test",
                                        "--allow-host", f"api.example.test:{up.port}",
                                        "--allow-host", f"plain.example.test:{up.port}", "--", "sh", "-c", script),
                           cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert (ws / "api.code").read_text() == "200" and (ws / "plain.code").read_text() == "200"
        assert "firma" in (ws / "api.issuer").read_text()
        assert "firma" not in (ws / "plain.issuer").read_text() and (ws / "plain.issuer").read_text().strip()  # control
        assert sorted(h["path"] for h in up.hits) == ["/api", "/plain"]
        st = os.stat(key)
        assert st.st_uid == u.pw_uid and stat.S_IMODE(st.st_mode) == 0o600  # the user's own CA, outside
        assert (ws / "key.out").read_text() == "" and (ws / "key.err").read_text().strip()
        with open(state / "audit.jsonl") as f:
            events = [json.loads(line) for line in f]
        assert [e for e in events if e["resource"] == f"GET https://api.example.test:{up.port}/api"]
    finally:
        up.close()

"""`firma conformance` and the reference runner as an unprivileged user: all six invariants pass
without root (the raw-socket sub-probe is then reported as not judged, since the host control
cannot send one). Started as root, which creates the test user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.confinement, pytest.mark.unprivileged]

USER = "firma-test"
PY = "/usr/bin/python3.11"
PACKAGES = ("cedarpy", "cryptography", "cffi", "pyseccomp.py", "idna")


def ensure_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.fail("the unprivileged conformance test must be started as root (it creates the test user)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    p = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       capture_output=True, text=True)
    if p.returncode != 0 and "already exists" not in p.stderr:
        pytest.fail(f"cannot create test user {USER}: {p.stderr.strip()}")
    return pwd.getpwnam(USER)


def test_conformance_passes_unprivileged():
    if shutil.which("bwrap") is None or shutil.which("setpriv") is None:
        pytest.fail("bwrap and setpriv are required; run scripts/install-system-deps.sh")
    if not os.access(PY, os.X_OK):
        pytest.fail(f"{PY} is needed to run firma as an unprivileged user")
    user = ensure_user()
    root = Path(tempfile.mkdtemp(prefix="firma-unpriv-conf-"))
    try:
        os.chmod(root, 0o755)
        import cedarpy

        import firma

        # A world-readable copy of firma and its dependencies: the checkout may not be readable.
        shutil.copytree(Path(firma.__file__).resolve().parent, root / "lib" / "firma",
                        ignore=shutil.ignore_patterns("__pycache__"))
        site = Path(cedarpy.__file__).resolve().parents[1]
        for name in PACKAGES:
            s = site / name
            (shutil.copytree if s.is_dir() else shutil.copy)(s, root / "lib" / name)
        for so in site.glob("_cffi_backend*.so"):
            shutil.copy(so, root / "lib" / so.name)
        runner = root / "firma-runner-linux"
        # The runner is started with the contract's environment, so it sets its own import path.
        runner.write_text(
            "#!/bin/sh\n"
            f'PYTHONPATH="{root}/lib" exec {PY} -c '
            '"import sys; from firma.runner_linux import main; sys.exit(main())" "$@"\n'
        )
        home = root / "home"
        home.mkdir()
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        os.chmod(runner, 0o755)
        os.chown(home, user.pw_uid, user.pw_gid)
        evidence = home / "evidence"
        r = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--inh-caps=-all",
             PY, "-m", "firma", "conformance", "--runner", str(runner), "--json", "--evidence-dir", str(evidence)],
            cwd=home, capture_output=True, text=True, timeout=600,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                 "LOGNAME": USER, "PYTHONPATH": f"{root}/lib"},
        )
        assert r.stdout, r.stderr[-2000:]
        report = json.loads(r.stdout)
        failing = {x["invariant"]: x["evidence"] for x in report["results"] if x["result"] != "pass"}
        assert not failing and r.returncode == 0, failing
        # The evidence was written by the unprivileged user's sandboxed probes.
        files = [f for x in report["results"] for f in x["files"]]
        assert files and all(os.stat(f).st_uid == user.pw_uid for f in files)
        bypass = next(x for x in report["results"] if x["invariant"] == "direct_bypass_resistant")
        assert any(c["name"].startswith("note: raw-socket") for c in bypass["checks"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

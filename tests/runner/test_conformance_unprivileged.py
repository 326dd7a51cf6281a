"""`firma conformance` and the reference runner as an unprivileged user: all six invariants pass
without root (the raw-socket sub-probe is then reported as not judged, since the host control
cannot send one). Started as root, which creates the test user."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from unprivileged_support import PY, make_install, remove_install

pytestmark = [pytest.mark.confinement, pytest.mark.unprivileged]


def test_conformance_passes_unprivileged():
    inst = make_install("firma-unpriv-conf-")
    try:
        runner = inst.root / "firma-runner-linux"
        # The runner is started with the contract's environment, so it sets its own import path.
        runner.write_text(
            "#!/bin/sh\n"
            f'PYTHONPATH="{inst.pythonpath}" exec {PY} -c '
            '"import sys; from firma.runner.linux import main; sys.exit(main())" "$@"\n'
        )
        os.chmod(runner, 0o755)
        user = inst.user
        evidence = inst.home / "evidence"
        r = subprocess.run(
            inst.argv(PY, "-m", "firma", "conformance", "--runner", str(runner), "--json",
                      "--evidence-dir", str(evidence)),
            cwd=inst.home, capture_output=True, text=True, timeout=600, env=inst.env(),
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
        remove_install(inst)

"""Runs the real `firma` CLI on a Linux machine as if it were macOS: the one thing replaced is the
platform probe (`detect_host`), which reports `darwin` and the fake sandbox-exec named by
VZ_TEST_SANDBOX_EXEC (empty = none). Everything else — planner, gates, sidecar, bridge, DNS stub,
vz backend, supervisor, proof — is the real code."""

import os
import sys

import firma.cli.run as cli_run
from firma.cli.main import entry
from firma.core.record import replace
from firma.host import detect_host as real_detect_host


def macos_host(environ=None, binaries=None):
    host = real_detect_host(environ, binaries)
    return replace(
        host, system="darwin", kernel_osrelease="24.0.0",
        sandbox_exec_path=os.environ.get("VZ_TEST_SANDBOX_EXEC") or None,
    )


cli_run.detect_host = macos_host
sys.exit(entry())

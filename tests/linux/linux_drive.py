"""Runs the real `firma` CLI. Until firma.services lands, the lifecycle's service kit is the
minimal stand-in from linux_fakekit (the tests report which one they used)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import firma.lifecycle as lifecycle  # noqa: E402
from firma.cli import main  # noqa: E402

try:
    lifecycle.default_kit()
except Exception:  # noqa: BLE001 - services not there yet
    from linux_fakekit import fake_kit

    lifecycle.default_kit = fake_kit

sys.exit(main(sys.argv[1:]))

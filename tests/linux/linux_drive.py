"""Runs the real `firma` CLI (as `python -m firma` would), from the test directory's python."""

import sys

from firma.cli.main import entry

sys.exit(entry())

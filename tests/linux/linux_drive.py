"""Runs the real `firma` CLI (as `python -m firma` would), from the test directory's python.

FIRMA_TEST_RESOLVE (JSON: name -> [addresses]) replaces the sidecar's host-side resolver, so
tests name destinations without real DNS (the workplace's rule): any other name fails to
resolve. It is read here, in the test driver, never by firma."""

import json
import os
import sys

from firma.cli.main import entry

_table = os.environ.get("FIRMA_TEST_RESOLVE")
if _table:
    import firma.services.sidecar as _sidecar

    _names = json.loads(_table)

    async def _resolve(host: str, port: int) -> list[str]:
        if host in _names:
            return list(_names[host])
        raise OSError(f"test resolver: {host} is not in FIRMA_TEST_RESOLVE")

    _sidecar.system_resolver = _resolve

sys.exit(entry())

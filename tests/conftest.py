"""Shared test settings: a hypothesis profile for CI (fixed seed, no per-example deadline, no
example database), chosen when the CI environment variable is set, so a CI failure reproduces and a
loaded 2-CPU runner never fails a property test on timing alone."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

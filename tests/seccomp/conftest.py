"""Fixtures for tests/seccomp: the helpers live in seccomp_support (a unique module name, since
several test directories import their helpers by module name)."""

from seccomp_support import *  # noqa: F403 - registers the fixtures defined there

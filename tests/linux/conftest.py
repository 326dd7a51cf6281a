"""Fixtures for tests/linux: the helpers live in linux_support (a unique module name, since
several test directories import their helpers by module name)."""

from linux_support import *  # noqa: F403 - registers the fixtures defined there

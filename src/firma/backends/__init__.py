"""Backend registry: a name → a fresh backend instance. Imports are lazy so a host only loads the
backend it uses (and a missing optional module fails only the backend that needs it)."""

from __future__ import annotations

import importlib

from ..core.model import BACKENDS
from ..errors import UnsupportedBackendError

_REGISTRY = {
    "bwrap": ("firma.backends.bwrap.backend", "BwrapBackend"),
    "vz": ("firma.backends.vz", "VzBackend"),
    "runner": ("firma.backends.runner", "RunnerBackend"),
}


def backend_for(name: str):
    """A new, unprepared backend for `name` (no-arg constructor)."""
    if name not in BACKENDS or name not in _REGISTRY:
        raise UnsupportedBackendError.unknown(name)
    modname, cls = _REGISTRY[name]
    try:
        module = importlib.import_module(modname)
    except ImportError as exc:
        raise UnsupportedBackendError.on_host(name, f"backend module unavailable ({exc})") from None
    return getattr(module, cls)()

"""firma: run AI agents inside an OS sandbox whose only way out is a policy sidecar."""

__version__ = "0.1.0"

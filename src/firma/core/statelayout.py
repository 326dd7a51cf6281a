"""The state layout, named once (pure): every name and path under the state root, and the inverse
from a run directory to its state root. firma.run.state creates and removes them privately."""

from __future__ import annotations

import posixpath

AUDIT_LOG = "audit.jsonl"
AUDIT_KEY = "audit.key"
RUN_LOG = "run.log"
SIDECAR_SOCKET = "sidecar.sock"
RUNS = "run"
PROOFS = "proofs"
OWNER = "owner"  # in a run dir: "<launcher pid> <its start time in clock ticks>"
# In a run dir, for the post-run workspace check: an empty file whose ctime is the baseline, and
# the workspace's .git/index as it was at launch.
WORKSPACE_BASELINE = "workspace-baseline"
LAUNCH_INDEX = "launch-index"


def audit_log_path(root: str) -> str:
    return posixpath.join(root, AUDIT_LOG)


def audit_key_path(root: str) -> str:
    return posixpath.join(root, AUDIT_KEY)


def audit_key_beside(audit_log: str) -> str:
    """The signing key of an audit log named by the user (`--audit`): audit.key next to it."""
    return posixpath.join(posixpath.dirname(audit_log), AUDIT_KEY)


def run_dir_path(root: str, sandbox_id: str) -> str:
    """`<root>/run/<sandbox_id>`: the run's runtime_dir in the envelope."""
    return posixpath.join(root, RUNS, sandbox_id)


def state_root_of_run_dir(run_dir: str) -> str:
    """The inverse of run_dir_path: the state root a runtime_dir lives in."""
    return posixpath.dirname(posixpath.dirname(run_dir.rstrip("/")))


# firma's HTTPS inspection CA (firma.castore): one per user, kept across runs.
CA_DIR = "ca"
CA_KEY = "ca.key"  # PEM PKCS#8, 0600
CA_CERT = "ca.pem"
CA_LOCK = ".lock"  # in CA_DIR: readers share it, a rotation holds it alone


def ca_dir_path(root: str) -> str:
    return posixpath.join(root, CA_DIR)


def ca_key_path(root: str) -> str:
    return posixpath.join(root, CA_DIR, CA_KEY)


def ca_cert_path(root: str) -> str:
    return posixpath.join(root, CA_DIR, CA_CERT)


def ca_lock_beside(ca_file: str) -> str:
    """The lock of the CA whose key or certificate is `ca_file`."""
    return posixpath.join(posixpath.dirname(ca_file), CA_LOCK)

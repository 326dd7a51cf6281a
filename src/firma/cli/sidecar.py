"""`firma sidecar`: the standalone policy sidecar. Prints its endpoint, writes the startup report
only once policy, audit key and listener are all up, serves until SIGTERM/SIGINT, flushes audit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from ..core.statelayout import audit_key_beside, audit_log_path
from ..errors import FirmaError, SidecarError


def add_parser(sub):
    p = sub.add_parser("sidecar", help="run the standalone policy sidecar (serves until SIGTERM)")
    p.add_argument("--listen", default="tcp://127.0.0.1:0", help="tcp://HOST:PORT or unix:///PATH (default tcp://127.0.0.1:0)")
    p.add_argument("--allow-host", action="append", default=[], metavar="PATTERN", help="allow HOST[:PORT] or *.DOMAIN (repeatable)")
    p.add_argument("--policy", metavar="FILE", help="Cedar policy file")
    p.add_argument("--audit", metavar="FILE", help="signed audit log (default <state root>/audit.jsonl)")
    p.add_argument("--audit-key", metavar="FILE", help="signing key (default audit.key beside the audit log)")
    p.add_argument("--startup-report", metavar="PATH", help="write a TOML readiness report here once ready")
    p.add_argument("--monitor", action="store_true", help="observe only: denies pass through, logged as monitor_mode:")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls-key and --client-ca: mutual TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument("--client-ca", metavar="PEM", help="CA whose client certificates are accepted; required on a network address")
    p.add_argument("--max-client-connections", type=int, default=512, metavar="N",
                   help="open connections one client (uid or certificate) may hold (default 512)")
    p.add_argument("--max-client-rate", type=int, default=200, metavar="N",
                   help="requests per second one client may make, bursts of 2×N (default 200)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="also serve this uid's processes (default: only the sidecar's own user; repeatable)")
    return p


def write_startup_report(path: str, endpoint: str) -> None:
    """Atomic, written once: `protocol_version = 2`, `endpoint = "…"`."""
    from .. import privfs

    try:
        privfs.write_private(os.path.abspath(path), f'protocol_version = 2\nendpoint = "{endpoint}"\n')
    except OSError as exc:
        raise SidecarError(f"cannot write startup report {path}: {exc.strerror}") from None


async def _serve(args) -> int:
    from ..core.endpoint import listen_is_local
    from ..services.sidecar import Sidecar, SidecarConfig, SidecarLimits

    tls_args = (args.tls_cert, args.tls_key, args.client_ca)
    if any(tls_args) and not all(tls_args):
        raise SidecarError("mutual TLS needs all of --tls-cert, --tls-key and --client-ca")
    mutual_tls = all(tls_args)
    if not mutual_tls and not listen_is_local(args.listen):
        # Every client's attribution headers would be trusted and written into the signed audit,
        # and its requests carried out under this sidecar's policy: not on a network.
        raise SidecarError(
            f"refusing to listen on {args.listen}: a sidecar reachable from the network needs client "
            "authentication: give --tls-cert, --tls-key and --client-ca (mutual TLS), or listen on "
            "127.0.0.1 or a unix:// socket"
        )
    tls = None
    if mutual_tls:
        if args.listen.startswith("unix://"):
            raise SidecarError("mutual TLS is for tcp:// listeners; a unix:// socket checks its clients' uids")
        from ..services.tlsctx import server_context

        tls = server_context(args.tls_cert, args.tls_key, args.client_ca)
    audit = args.audit
    if not audit:
        from ..core.settings import state_root
        from ..run.state import ensure_private_dir

        root = state_root(os.environ, os.getuid())
        ensure_private_dir(root)
        audit = audit_log_path(root)
    key = args.audit_key or audit_key_beside(os.path.abspath(audit))
    from ..core.allowlist import check

    allowed = check(tuple(args.allow_host))
    for line in allowed.notes + allowed.warnings:
        print(f"firma sidecar: {line}", file=sys.stderr)
    sidecar = Sidecar(
        SidecarConfig(
            allow_hosts=allowed.patterns,
            # Clients are authenticated by certificate, or on this host by their uid.
            client_uids=None if mutual_tls else frozenset({os.geteuid(), *args.allow_uid}),
            limits=SidecarLimits(max_connections_per_client=args.max_client_connections,
                                 requests_per_client_per_sec=float(args.max_client_rate)), policy_path=args.policy, audit_path=audit, key_path=key, monitor=args.monitor
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        endpoint = await sidecar.start(args.listen, tls)
        if args.startup_report:
            write_startup_report(args.startup_report, endpoint)
        print(endpoint, flush=True)
        await stop.wait()
    finally:
        refused = sidecar.refused_clients
        await sidecar.aclose()
        if refused:
            print(f"firma sidecar: refused {refused} connections from other users", file=sys.stderr)
    return 0


def run(args) -> int:
    try:
        return asyncio.run(_serve(args))
    except FirmaError:
        raise
    except OSError as exc:
        raise SidecarError(f"sidecar failed: {exc}") from None
    finally:
        sys.stdout.flush()

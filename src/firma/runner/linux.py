"""`firma-runner-linux --launch-contract PATH`: the reference runner.

It enforces a launch contract with bubblewrap, reusing firma's own bwrap backend: the command runs
in a fresh network namespace that holds only `lo`, where this runner plants `127.0.0.1:18080` (TCP)
and `127.0.0.1:53` (UDP+TCP) and serves them from outside as plain byte relays to the contract's
`proxy_url` and `dns_stub_addr`. The host bridge and DNS stub do the deciding; the runner only
moves bytes, so when the bridge goes away the relay has nowhere to go and egress stops.

Steps: read the contract without following links, validate every runner-side rule (file mode
included), refuse to start unless the bridge and DNS stub answer (fail_closed_startup), build an
ExecutionEnvelope whose proxy variables name the planted endpoint, launch, forward signals,
exit with the command's status. Every failure before the command starts is one `[ERR]` line and
exit status 1; the command never runs."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..core.contract_validate import parse_contract, parse_host_port, validate_contract_bytes
from ..core.launchenv import PROXY_VARS
from ..core.profiles import COMMON_MASKED
from ..core.model import (
    PLANTED_DNS_ADDR,
    PLANTED_PROXY_ADDR,
    Check,
    ExecutionEnvelope,
    IdentityMode,
    Invariant,
    Mount,
    NetworkEndpoints,
    frozen_map,
)
from .. import privfs
from ..core.record import record, replace
from ..core.statelayout import run_dir_path
from ..errors import ContractError, FirmaError, LaunchError
from ..core import settings as env_names

PROG = "firma-runner-linux"
STARTUP_PROBE_TIMEOUT = 5.0
RELAY_CONNECT_TIMEOUT = 10.0
DNS_UPSTREAM_TIMEOUT = 5.0
MAX_DNS_INFLIGHT = 256


@record
class Upstreams:
    proxy: tuple[str, int]  # host bridge, from proxy_url
    dns: tuple[str, int]  # host DNS stub, from dns_stub_addr


def upstreams_from_contract(contract: Mapping[str, Any]) -> Upstreams:
    net = contract["network"]
    u = urlsplit(net["proxy_url"])
    if u.hostname is None or u.port is None:
        raise ContractError(f"proxy_url {net['proxy_url']} must name a host and port")
    dns = parse_host_port(net["dns_stub_addr"])
    assert dns is not None  # validated
    # firma serves the bridge and stub on host loopback; anything else in a contract handed to
    # this runner is not firma's and would send agent traffic (and DNS) off the machine.
    for what, host in (("proxy_url", u.hostname), ("dns_stub_addr", dns[0])):
        if not _is_loopback_ip(host):
            raise ContractError(
                f"{what} host {host} is not a loopback IP address; {PROG} only relays to the host "
                "bridge and DNS stub on loopback"
            )
    return Upstreams(proxy=(u.hostname, u.port), dns=dns)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def planted_proxy_url() -> str:
    return f"http://{PLANTED_PROXY_ADDR[0]}:{PLANTED_PROXY_ADDR[1]}"


def sandbox_env(contract: Mapping[str, Any]) -> dict[str, str]:
    """The contract's environment as the agent must see it: every variable that named the host
    bridge now names the planted endpoint (the only one reachable inside)."""
    env = dict(contract["command"]["env"])
    host_proxy = contract["network"]["proxy_url"].rstrip("/")
    inside = planted_proxy_url()
    for k, v in list(env.items()):
        if k in PROXY_VARS or v.rstrip("/") == host_proxy:
            env[k] = inside if v else v
    if env_names.DNS_STUB_ADDR in env:
        env[env_names.DNS_STUB_ADDR] = f"{PLANTED_DNS_ADDR[0]}:{PLANTED_DNS_ADDR[1]}"
    return env


def envelope_from_contract(contract: Mapping[str, Any], runtime_dir: str) -> ExecutionEnvelope:
    cmd = contract["command"]
    env = sandbox_env(contract)
    identity = {m.contract_name: m for m in IdentityMode}[cmd["identity_mode"]]
    return ExecutionEnvelope(
        sandbox_id=contract["sandbox_id"],
        runtime_dir=runtime_dir,
        executable=cmd["executable"],
        args=tuple(cmd["args"]),
        cwd=cmd["cwd"],
        env=frozen_map(env),
        identity_mode=identity,
        home=env.get("HOME") or cmd["cwd"],
        seccomp_filter_path=cmd["seccomp_filter_path"],
        mounts=tuple(Mount(m["source"], m["target"], m["read_only"]) for m in contract["mounts"]),
        # The contract v1 carries no masked paths: hide at least the credentials every profile
        # hides (DESIGN §2) under the command's HOME.
        mask_home_paths=COMMON_MASKED,
        network=NetworkEndpoints(
            proxy_url=planted_proxy_url(),
            dns_stub_addr=f"{PLANTED_DNS_ADDR[0]}:{PLANTED_DNS_ADDR[1]}",
            attribution_headers=frozen_map(contract["network"]["attribution_headers"]),
        ),
        invariants=tuple(Invariant(i["name"], i["mode"]) for i in contract["invariants"]),
    )


def with_hardening(envelope: ExecutionEnvelope, runtime_dir: str) -> ExecutionEnvelope:
    """A contract without a seccomp filter still gets firma's built-in hardening filter (io_uring,
    TIOCSTI, ptrace, mounts, namespaces, set-id modes, ...): null means "no policy", never "no
    filter". Compiled into this runner's private runtime directory."""
    if envelope.seccomp_filter_path is not None:
        return envelope
    from ..seccomp.store import prepare_filter  # noqa: PLC0415 - only for a contract without a filter

    art = prepare_filter(None, runtime_dir, os.uname().machine)
    return replace(envelope, seccomp_filter_path=art.path, seccomp_artifact=art)


# --- fail_closed_startup: the host paths must answer before the command may start -------------


def _dns_probe_query() -> bytes:
    # A query for the root zone, type NS, over UDP (the path the agent's resolver takes): the stub
    # answers REFUSED; a reply with our ID and QR set proves it is there. Only ever sent to the
    # contract's stub, which upstreams_from_contract has already required to be on loopback.
    return struct.pack("!HHHHHH", 0x5A5A, 0x0100, 1, 0, 0, 0) + b"\0" + struct.pack("!HH", 2, 1)


def check_upstreams(up: Upstreams, timeout: float = STARTUP_PROBE_TIMEOUT) -> list[Check]:
    checks = []
    try:
        with socket.create_connection(up.proxy, timeout=timeout):
            pass
        checks.append(Check("bridge_reachable", True, f"{up.proxy[0]}:{up.proxy[1]}"))
    except OSError as exc:
        checks.append(Check("bridge_reachable", False, f"{up.proxy[0]}:{up.proxy[1]}: {exc.strerror or exc}"))
    family = socket.AF_INET6 if ":" in up.dns[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect(up.dns)
            s.send(_dns_probe_query())
            reply = s.recv(4096)
        ok = len(reply) >= 12 and reply[:2] == b"\x5a\x5a" and reply[2] & 0x80
        checks.append(Check("dns_stub_reachable", bool(ok), f"{up.dns[0]}:{up.dns[1]}"))
    except OSError as exc:
        checks.append(Check("dns_stub_reachable", False, f"{up.dns[0]}:{up.dns[1]}: {exc.strerror or exc}"))
    return checks


# --- relays served on the planted sockets -----------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class Relays:
    """Byte relays: planted proxy TCP → bridge, planted DNS TCP/UDP → host stub."""

    def __init__(self, up: Upstreams) -> None:
        self.up = up
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, planted) -> None:
        self._servers.append(
            await asyncio.start_server(lambda r, w: self._tcp(r, w, self.up.proxy), sock=planted.proxy_tcp)
        )
        self._servers.append(
            await asyncio.start_server(lambda r, w: self._tcp(r, w, self.up.dns), sock=planted.dns_tcp)
        )
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _DnsUdp(self), sock=planted.dns_udp)
        self._transports.append(transport)

    def _track(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp(self, reader, writer, target: tuple[str, int]) -> None:
        self._writers.add(writer)
        try:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(*target), RELAY_CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                return  # the host side is gone: the agent's connection just closes (fail closed)
            self._writers.add(uw)
            try:
                await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
            finally:
                uw.close()
                self._writers.discard(uw)
        finally:
            writer.close()
            self._writers.discard(writer)

    async def aclose(self) -> None:
        for s in self._servers:
            s.close()
        for t in self._transports:
            t.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, relays: Relays) -> None:
        self.relays = relays
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if self.inflight >= MAX_DNS_INFLIGHT:
            return  # bounded: a flood drops queries rather than growing without limit
        self.inflight += 1
        self.relays._track(self._forward(data, addr))

    async def _forward(self, data: bytes, client) -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        class _Up(asyncio.DatagramProtocol):
            def datagram_received(self, reply, _addr):
                if not got.done():
                    got.set_result(reply)

            def error_received(self, exc):
                if not got.done():
                    got.set_exception(exc)

        transport = None
        try:
            transport, _ = await loop.create_datagram_endpoint(_Up, remote_addr=self.relays.up.dns)
            transport.sendto(data)
            reply = await asyncio.wait_for(got, DNS_UPSTREAM_TIMEOUT)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(reply, client)
        except (OSError, asyncio.TimeoutError):
            pass  # no answer for the agent; never a fallback resolver
        finally:
            self.inflight -= 1
            if transport is not None:
                transport.close()


# --- where the bwrap backend's generated files go -------------------------------------------


@record
class RuntimeDir:
    path: str
    temp_root: str | None  # a private temp tree we made (removed whole)
    preexisting: frozenset[str] = frozenset()  # names already in firma's runtime_dir

    def cleanup(self) -> None:
        if self.temp_root is not None:
            shutil.rmtree(self.temp_root, ignore_errors=True)
            return
        # Remove only what this run added (resolv.conf, hosts, passwd, group), never firma's files.
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            if name in self.preexisting:
                continue
            p = os.path.join(self.path, name)
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    os.unlink(p)
            except OSError:
                pass


def choose_runtime_dir(contract: Mapping[str, Any]) -> RuntimeDir:
    """firma's per-run directory when it is a private directory of ours, else a private temp tree.

    The bwrap backend hides `<runtime_dir>/../..` (the state root) from the agent. With firma's own
    runtime_dir that is firma's state root — the audit signing key, the proofs and this contract —
    which must stay out of the agent's reach wherever FIRMA_STATE_DIR points."""
    path = contract["runtime_dir"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        tmp = tempfile.mkdtemp(prefix="firma-runner-")
        inner = run_dir_path(tmp, contract["sandbox_id"])  # firma's layout: the plan hides its root
        os.makedirs(inner, mode=0o700)
        return RuntimeDir(inner, tmp)
    except OSError as exc:
        raise LaunchError(f"cannot inspect runtime_dir {path}: {exc.strerror}") from None
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or stat.S_IMODE(st.st_mode) & 0o077
    ):
        raise LaunchError(
            f"runtime_dir {path} must be a directory owned by uid {os.geteuid()} with mode 0700 "
            "(not a link); refusing to write the sandbox's generated files there"
        )
    return RuntimeDir(path, None, frozenset(os.listdir(path)))


# --- main ------------------------------------------------------------------------------------


def load_contract(path: str) -> dict[str, Any]:
    from ..backends.external import read_contract_file  # noqa: PLC0415 - the runner's start only

    if not path.startswith("/"):
        path = os.path.abspath(path)
    raw, mode = read_contract_file(path)
    problems = validate_contract_bytes(raw, mode, file_exists=os.path.isfile, realpath=os.path.realpath)
    if problems:
        raise ContractError(
            f"launch contract {path} is invalid ({len(problems)} problem(s)): "
            + "; ".join(str(p) for p in problems[:5])
        )
    data, _ = parse_contract(raw)
    return data


async def run_contract(contract: dict[str, Any], log, debug=lambda _msg: None) -> int:
    """Enforce `contract`; the command's exit status. `log` reaches the operator (stderr);
    `debug` gets the sandbox's measured checks and the backend's progress lines, which must not
    go to stdout/stderr: the command owns those."""
    from ..backends.base import LaunchHooks  # noqa: PLC0415 - loaded once the contract is valid (a refused contract costs nothing more)
    from ..backends.bwrap.backend import BwrapBackend  # noqa: PLC0415 - loaded once the contract is valid (a refused contract costs nothing more)
    from ..run.signals import Supervisor, cancel_current_task, close_services, stop_child  # noqa: PLC0415 - loaded once the contract is valid (a refused contract costs nothing more)

    up = upstreams_from_contract(contract)
    startup_mode = next(i["mode"] for i in contract["invariants"] if i["name"] == "fail_closed_startup")
    checks = await asyncio.to_thread(check_upstreams, up)
    bad = [c for c in checks if not c.ok]
    if bad:
        if startup_mode == "required":
            raise LaunchError(
                f"{bad[0].name.replace('_', ' ')} check failed ({bad[0].detail}); refusing to start "
                "the command (fail_closed_startup); start the host bridge and DNS stub first"
            )
        log(f"WARN fail_closed_startup is disabled_by_policy: {bad[0].name} failed ({bad[0].detail})")

    def add_check(check: Check) -> None:
        checks.append(check)
        debug(f"check {check.name} ok={str(check.ok).lower()} {check.detail}")

    def teardown_log(msg: str, _level: str = "error") -> None:
        debug(msg)

    rt = choose_runtime_dir(contract)
    relays = Relays(up)
    child = None
    sup = Supervisor(on_early_signal=cancel_current_task())
    sup.install()
    try:
        runtime_dir = rt.path
        envelope = with_hardening(envelope_from_contract(contract, runtime_dir), runtime_dir)
        hooks = LaunchHooks(serve_planted=relays.serve, add_check=add_check, log=debug)
        try:
            child = await BwrapBackend().launch(envelope, hooks)
        except asyncio.CancelledError:
            if sup.early_signal is not None:
                return 128 + sup.early_signal  # told to stop before the command started
            raise
        sup.attach(child)
        return await sup.wait()
    finally:
        sup.uninstall()
        if child is not None:
            await stop_child(child, teardown_log)
        await close_services([relays], teardown_log)
        rt.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Reference Linux runner: enforce a firma launch contract with bubblewrap.")
    parser.add_argument("--launch-contract", required=True, metavar="PATH")
    parser.add_argument(
        "--log-file", metavar="PATH",
        help="append the sandbox's measured checks and launch progress here (never to stdout/stderr: the command owns them)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def log(msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    debug_file = None
    try:
        if args.log_file:
            try:
                fd = privfs.open_append(args.log_file)
            except OSError as exc:
                raise LaunchError(f"cannot open --log-file {args.log_file}: {exc.strerror}") from None
            debug_file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        sink = debug_file

        def debug(msg: str) -> None:
            if sink is not None:
                try:
                    sink.write(f"{PROG}: {msg}\n")
                except (OSError, ValueError):
                    pass

        contract = load_contract(args.launch_contract)
        return asyncio.run(run_contract(contract, log, debug))
    except FirmaError as exc:
        print(f"[ERR]  {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if debug_file is not None:
            debug_file.close()


if __name__ == "__main__":
    sys.exit(main())

"""The conformance kit: runs real firma host services on loopback, launches each probe through a
runner (`<runner> --launch-contract <path>`) and directly on the host (positive control), and
judges the six invariants from what its listeners recorded.

Everything the probes may touch is a listener this kit runs on 127.0.0.1 / ::1:
- an upstream HTTP origin the policy allows (the sidecar's allow rule names its exact host:port);
- a must-not-connect TCP listener (v4, and v6 when the host has ::1) and UDP listener (also the
  stand-in for an outside resolver);
- the real firma Sidecar, a fresh Bridge per run, and the DNS refusal stub (recording queries).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from ...backends.external import runner_argv
from ...core.contract_validate import validate_contract
from ...core.model import (
    ExecutionEnvelope,
    IdentityMode,
    Mount,
    NetworkEndpoints,
    frozen_map,
)
from ... import privfs
from ...core import wire
from ...core.record import record
from ...core.statelayout import audit_key_path, audit_log_path
from ...errors import FirmaError
from . import probes as probes_module
from .judge import (
    InvariantResult,
    Report,
    RunObservation,
    judge_direct_bypass_resistant,
    judge_dns_confined,
    judge_fail_closed_runtime,
    judge_fail_closed_startup,
    judge_preserve_stdio_signals_exit,
    judge_sidecar_only_egress,
)
from .listeners import TrapTcp, TrapUdp, Upstream, reserve_dead_port

RUN_TIMEOUT = 90.0  # a runner that hangs is a failure, not a stuck kit
READY_TIMEOUT = 60.0


class ConformanceError(FirmaError):
    """The kit itself could not run (not a runner failure)."""


class _Loop:
    """An asyncio loop on its own thread for the firma services."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="conformance-services", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def default_probe_python() -> str:
    """The probes are stdlib-only: prefer the system interpreter, which a sandbox that masks home
    directories (bwrap as root masks /root) still shows; else the real path of this one."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


def new_sandbox_id() -> str:
    # Kit-made ids are only labels for attribution; the kit never hands them to a firma run.
    return "sbx_" + uuid.uuid4().hex


@record(frozen=False)
class _Launched:
    exit_code: int | None
    stdout: str
    stderr: str
    ready_seen: bool | None


class Kit:
    def __init__(self, runner_path: str, work_dir: str, *, python: str | None = None) -> None:
        self.runner_path = runner_path
        self.work = Path(work_dir)
        self.python = python or default_probe_python()
        self.token = secrets.token_hex(8)
        self._dns_lock = threading.Lock()
        self._dns_seen: list[str] = []
        self._closers: list[Callable[[], None]] = []

    # --- setup / teardown ----------------------------------------------------------------

    def __enter__(self) -> "Kit":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        try:
            from ...services.bridge import Bridge  # noqa: F401 - imported only to fail early when the host services are not installed
            from ...services.dns_stub import DnsStub
            from ...services.sidecar import Sidecar, SidecarConfig
        except ImportError as exc:
            raise ConformanceError(f"conformance kit needs the firma host services: {exc}") from exc
        # Private-path rule: the work tree is ours and 0700 (an existing one of another user, with
        # loose modes or behind a symlink is refused), so nobody else can plant the probes run here.
        try:
            privfs.ensure_dir(str(self.work))
            for sub in ("evidence", "contracts", "probe", "run", "state"):
                privfs.ensure_dir(str(self.work / sub))
        except privfs.PrivatePathError as exc:
            raise ConformanceError(f"evidence directory: {exc}") from None
        self.evidence_dir = str(self.work / "evidence")
        self.probe_dir = str(self.work / "probe")
        self.probe_script = str(self.work / "probe" / "probes.py")
        with open(probes_module.__file__, "rb") as f:
            source = f.read()
        try:
            os.unlink(self.probe_script)  # a leftover (or planted link) is removed, never followed
        except FileNotFoundError:
            pass
        # The probe dir is mounted read-only for the sandbox user; the script itself is not secret.
        fd = os.open(self.probe_script, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(source)
            os.fchmod(out.fileno(), 0o644)
        os.chmod(self.probe_dir, 0o755)

        self.upstream = Upstream(self.token)
        self.trap = TrapTcp("127.0.0.1")
        self.trap6 = TrapTcp("::1") if _ipv6_loopback() else None
        self.trap_udp = TrapUdp("127.0.0.1")
        for x in (self.upstream, self.trap, self.trap6, self.trap_udp):
            if x is not None:
                self._closers.append(x.close)

        self.loop = _Loop()
        self._closers.append(self.loop.close)
        state = self.work / "state"
        cfg = SidecarConfig(
            allow_hosts=(self.upstream.addr,),
            policy_path=None,
            audit_path=audit_log_path(str(state)),
            key_path=audit_key_path(str(state)),
        )

        async def start_services():
            sidecar = Sidecar(cfg)
            endpoint = await sidecar.start("tcp://127.0.0.1:0")
            stub = DnsStub(on_query=self._on_dns_query)
            port = await stub.serve_address("127.0.0.1", 0)
            return sidecar, endpoint, stub, port

        self.sidecar, self.sidecar_endpoint, self.dns_stub, dns_port = self.loop.run(start_services())
        self._closers.append(lambda: self.loop.run(self.sidecar.aclose()))
        self._closers.append(lambda: self.loop.run(self.dns_stub.aclose()))
        self.dns_stub_addr = f"127.0.0.1:{dns_port}"

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # noqa: BLE001 - teardown continues whatever one part says
                pass

    def _on_dns_query(self, qname: str, qtype: int, answered: bool = False) -> None:
        with self._dns_lock:
            self._dns_seen.append(qname)

    def _dns_snapshot(self) -> int:
        with self._dns_lock:
            return len(self._dns_seen)

    # --- one probe run -------------------------------------------------------------------

    def _start_bridge(self, sandbox_id: str, attribution):
        from ...services.bridge import Bridge

        async def start():
            bridge = Bridge(sidecar_endpoint=self.sidecar_endpoint, attribution=attribution)
            port = await bridge.serve_address("127.0.0.1", 0)
            return bridge, port

        return self.loop.run(start())

    def _kill_bridge(self, bridge) -> None:
        self.loop.run(bridge.aclose())

    def _params(self, probe: str, phase: str, nonce: str) -> dict[str, Any]:
        return {
            "nonce": nonce,
            "phase": phase,
            "evidence": os.path.join(self.evidence_dir, f"{probe}-{phase}-{nonce}.json"),
            "upstream": self.upstream.addr,
            "trap_tcp": self.trap.addr,
            "trap_tcp6": self.trap6.addr if self.trap6 else None,
            "trap_udp": self.trap_udp.addr,
            "sidecar": self.sidecar_endpoint.split("://", 1)[1] if self.sidecar_endpoint.startswith("tcp://") else None,
            "dns_name": f"probe-{nonce}.conformance.invalid",
        }

    def attribution(self, sandbox_id: str) -> dict[str, str]:
        return wire.attribution_headers(
            sandbox_id=sandbox_id, session_id=f"conformance-{self.token}", profile="generic",
            agent_id="conformance", user="conformance",
        )

    def envelope(self, sandbox_id: str, params: dict[str, Any], proxy_url: str, dns_addr: str,
                 probe: str) -> ExecutionEnvelope:
        attribution = self.attribution(sandbox_id)
        env = {
            "HOME": self.evidence_dir,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "FIRMA_RUN_SANDBOX_ID": sandbox_id,
            "NO_PROXY": "",
            "no_proxy": "",
        }
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[var] = env[var.lower()] = proxy_url
        runtime_dir = self.work / "run" / sandbox_id
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        return ExecutionEnvelope(
            sandbox_id=sandbox_id,
            runtime_dir=str(runtime_dir),
            executable=self.python,
            args=("-I", self.probe_script, probe, json.dumps(params, separators=(",", ":"))),
            cwd=self.evidence_dir,
            env=frozen_map(env),
            identity_mode=IdentityMode.SANDBOX_USER,
            home=self.evidence_dir,
            seccomp_filter_path=None,
            mounts=(
                Mount(self.probe_dir, self.probe_dir, True),
                Mount(self.evidence_dir, self.evidence_dir, False),
            ),
            mask_home_paths=(),
            network=NetworkEndpoints(proxy_url, dns_addr, frozen_map(attribution)),
        )

    def _write_contract(self, env: ExecutionEnvelope) -> str:
        from ...backends.external import write_private
        from ...core.contract import build_contract, contract_json

        contract = build_contract(env, self.runner_path)
        problems = validate_contract(contract)
        if problems:
            # The kit's own contract must be valid, or a runner refusing it proves nothing.
            raise ConformanceError(f"kit built an invalid contract: {problems[0]}")
        path = str(self.work / "contracts" / f"{env.sandbox_id}.json")
        write_private(path, contract_json(contract))
        return path

    def _spawn(self, argv: list[str], env: dict[str, str] | None, cwd: str | None, *,
               stdin_data: str | None, on_ready: Callable[[subprocess.Popen], None] | None,
               nonce: str) -> _Launched:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True,
        )
        out_lines: "queue.Queue[str | None]" = queue.Queue()
        out_buf: list[str] = []
        err_buf: list[str] = []

        def pump(stream, buf, q=None):
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                buf.append(line)
                if q is not None:
                    q.put(line)
            if q is not None:
                q.put(None)

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, out_buf, out_lines), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, err_buf), daemon=True),
        ]
        for t in threads:
            t.start()
        ready_seen: bool | None = None
        try:
            if stdin_data is not None:
                assert proc.stdin is not None  # started with stdin=PIPE
                proc.stdin.write(stdin_data.encode())
                proc.stdin.flush()
            if on_ready is not None:
                ready_seen = False
                while True:
                    try:
                        line = out_lines.get(timeout=READY_TIMEOUT)
                    except queue.Empty:
                        break
                    if line is None:
                        break
                    if line.strip() == f"READY {nonce}":
                        ready_seen = True
                        on_ready(proc)
                        break
            if (on_ready is None or stdin_data is not None) and proc.stdin is not None:
                proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            code: int | None = proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        for t in threads:
            t.join(10)
        for s in (proc.stdin, proc.stdout, proc.stderr):
            if s is None:
                continue
            try:
                s.close()
            except OSError:
                pass
        if code is not None and code < 0:
            code = 128 - code
        return _Launched(code, "".join(out_buf), "".join(err_buf), ready_seen)

    def run_probe(self, probe: str, side: str, *, live_services: bool = True,
                  stdin_for: Callable[[str], str] | None = None,
                  on_ready: Callable[["Kit", Any, subprocess.Popen], None] | None = None) -> RunObservation:
        """One probe run. side "runner": through the runner; "control": directly on the host."""
        nonce = secrets.token_hex(6)
        params = self._params(probe, side, nonce)
        sandbox_id = new_sandbox_id()
        bridge = None
        dead = None
        if live_services:
            bridge, port = self._start_bridge(sandbox_id, self.attribution(sandbox_id))
            proxy_url, dns_addr = f"http://127.0.0.1:{port}", self.dns_stub_addr
        else:
            dead = reserve_dead_port()
            dead_port = dead.getsockname()[1]
            proxy_url, dns_addr = f"http://127.0.0.1:{dead_port}", f"127.0.0.1:{dead_port}"
        env = self.envelope(sandbox_id, params, proxy_url, dns_addr, probe)
        dns_before = self._dns_snapshot()
        marks = self._marks()  # start of phase: everything earlier belongs to earlier runs
        hook = None
        if on_ready is not None:
            hook = lambda proc: on_ready(self, bridge, proc)
        try:
            if side == "runner":
                contract = self._write_contract(env)
                # Started exactly as firma starts a runner: the contract's environment and cwd.
                launched = self._spawn(
                    runner_argv(self.runner_path, contract), dict(env.env), env.cwd,
                    stdin_data=stdin_for(nonce) if stdin_for else None, on_ready=hook, nonce=nonce,
                )
            else:
                launched = self._spawn(
                    [env.executable, *env.args], dict(env.env), env.cwd,
                    stdin_data=stdin_for(nonce) if stdin_for else None, on_ready=hook, nonce=nonce,
                )
        finally:
            if bridge is not None:
                try:
                    self._kill_bridge(bridge)
                except Exception:  # noqa: BLE001 - already closed by the runtime probe
                    pass
            if dead is not None:
                dead.close()
        since = self._since(marks)
        with self._dns_lock:
            dns_seen = tuple(self._dns_seen[dns_before:])
        evidence = None
        ev_file = params["evidence"]
        try:
            with open(ev_file) as f:
                doc = json.load(f)
            if doc.get("nonce") == nonce and doc.get("probe") == probe:
                evidence = doc.get("result")
        except (OSError, ValueError):
            ev_file = None
        return RunObservation(
            side=side, nonce=nonce, exit_code=launched.exit_code, stdout=launched.stdout,
            stderr=launched.stderr, evidence=evidence, evidence_file=ev_file,
            trap_tcp=since["trap"], trap_tcp6=since["trap6"], trap_udp=since["trap_udp"],
            upstream_paths=since["upstream"], dns_queries=dns_seen, ready_seen=launched.ready_seen,
        )

    def _marks(self) -> dict[str, int]:
        return {
            "trap": len(self.trap.barrier()),
            "trap6": len(self.trap6.barrier()) if self.trap6 else 0,
            "trap_udp": len(self.trap_udp.barrier()),
            "upstream": len(self.upstream.barrier()),
        }

    def _since(self, marks: dict[str, int]) -> dict[str, Any]:
        up = self.upstream.barrier()[marks["upstream"]:]
        return {
            "trap": tuple(a.data for a in self.trap.barrier()[marks["trap"]:]),
            "trap6": tuple(a.data for a in self.trap6.barrier()[marks["trap6"]:]) if self.trap6 else None,
            "trap_udp": tuple(a.data for a in self.trap_udp.barrier()[marks["trap_udp"]:]),
            "upstream": tuple(self.upstream.paths(up)),
        }

    # --- the six invariants --------------------------------------------------------------

    def run_all(self) -> list[InvariantResult]:
        return [
            self.check_sidecar_only_egress(),
            self.check_dns_confined(),
            self.check_fail_closed_startup(),
            self.check_fail_closed_runtime(),
            self.check_direct_bypass_resistant(),
            self.check_preserve_stdio_signals_exit(),
        ]

    def check_sidecar_only_egress(self) -> InvariantResult:
        return judge_sidecar_only_egress(
            self.run_probe("egress", "control"), self.run_probe("egress", "runner"), self.token
        )

    def check_dns_confined(self) -> InvariantResult:
        return judge_dns_confined(self.run_probe("dns", "control"), self.run_probe("dns", "runner"))

    def check_fail_closed_startup(self) -> InvariantResult:
        return judge_fail_closed_startup(
            self.run_probe("startup", "control"),
            self.run_probe("startup", "runner"),
            self.run_probe("startup", "runner", live_services=False),
        )

    def check_fail_closed_runtime(self) -> InvariantResult:
        def kill_then_go(kit: "Kit", bridge, proc: subprocess.Popen) -> None:
            kit._kill_bridge(bridge)  # the host bridge goes away mid-run
            assert proc.stdin is not None  # started with stdin=PIPE
            proc.stdin.write(b"GO\n")
            proc.stdin.flush()
            proc.stdin.close()

        return judge_fail_closed_runtime(
            self.run_probe("runtime", "control", on_ready=kill_then_go),
            self.run_probe("runtime", "runner", on_ready=kill_then_go),
        )

    def check_direct_bypass_resistant(self) -> InvariantResult:
        return judge_direct_bypass_resistant(
            self.run_probe("bypass", "control"), self.run_probe("bypass", "runner")
        )

    def check_preserve_stdio_signals_exit(self) -> InvariantResult:
        def term(kit: "Kit", bridge, proc: subprocess.Popen) -> None:
            proc.send_signal(signal.SIGTERM)  # to the runner only: forwarding is its job

        def stdio(side: str) -> RunObservation:
            return self.run_probe("stdio", side, stdin_for=lambda nonce: f"hello-{nonce}\n")

        return judge_preserve_stdio_signals_exit(
            stdio("control"), stdio("runner"),
            self.run_probe("signal", "control", on_ready=term),
            self.run_probe("signal", "runner", on_ready=term),
            self.run_probe("signal-default", "control", on_ready=term),
            self.run_probe("signal-default", "runner", on_ready=term),
        )


def run_conformance(runner_path: str, work_dir: str, *, python: str | None = None) -> Report:
    runner = os.path.abspath(runner_path)
    if not os.path.isfile(runner) or not os.access(runner, os.X_OK):
        raise ConformanceError(f"runner {runner_path} is not an executable file; pass --runner PATH")
    if python is not None and not (os.path.isabs(python) and os.access(python, os.X_OK)):
        raise ConformanceError(f"probe interpreter {python} is not an absolute path to an executable")
    with Kit(runner, work_dir, python=python) as kit:
        results = kit.run_all()
    return Report(runner, kit.evidence_dir, tuple(results))

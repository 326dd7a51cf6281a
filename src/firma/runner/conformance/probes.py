"""Conformance probes: the programs the kit launches through a runner (and directly on the host,
as positive controls).

Standard library only, run as a script (`python -I probes.py NAME PARAMS_JSON`), so it works with
nothing of firma importable inside the sandbox. Each probe observes, writes an evidence JSON file
(with the kit's nonce, proving it ran) and exits; the kit judges. Every address a probe touches is
given by the kit and is a loopback listener the kit runs: probes never aim anywhere else. The only
name lookup (getaddrinfo) is for a name under the reserved `.invalid` TLD, and only once the probe
has seen that it is cut off from the host loopback and its resolver is a loopback address, so a
host resolver is never asked."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys

# The same names as firma.core.launchenv.PROXY_VARS, spelled here because this script runs alone inside
# the sandbox (nothing of firma importable); a test checks that the two agree.
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
IO_TIMEOUT = 5.0


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def err_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def http_get(addr: tuple[str, int], target: str, host_header: str) -> dict:
    """One HTTP/1.1 GET on a fresh connection; `target` is origin- or absolute-form."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.connect(addr)
            s.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return {"ok": False, "status": None, "body": "", "error": err_text(exc)}
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    return {
        "ok": status == 200,
        "status": status,
        "body": body.decode("utf-8", "replace")[:512],
        "error": None if status else "no HTTP response",
    }


def proxied_get(p: dict, path: str) -> dict:
    """GET http://<upstream><path> through the proxy named by the environment."""
    proxy = next((os.environ[v] for v in PROXY_VARS if os.environ.get(v)), None)
    if proxy is None:
        return {"ok": False, "status": None, "body": "", "error": "no proxy variable in environment"}
    hostport = proxy.split("://", 1)[-1].split("/", 1)[0]
    return dict(http_get(split_addr(hostport), f"http://{p['upstream']}{path}", p["upstream"]), proxy=proxy)


def direct_get(p: dict, path: str) -> dict:
    return http_get(split_addr(p["upstream"]), path, p["upstream"])


def tcp_touch(addr_text: str, payload: bytes) -> dict:
    """Connect and send a tagged payload; the kit's trap listener records what arrives."""
    host, port = split_addr(addr_text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.connect((host, port))
            s.sendall(payload)
        return {"connected": True, "error": None}
    except OSError as exc:
        return {"connected": False, "error": err_text(exc)}


def dns_query(name: str, qid: int = 0x4242) -> bytes:
    q = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def udp_exchange(addr_text: str, payload: bytes, wait_reply: bool) -> dict:
    host, port = split_addr(addr_text)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            s.sendto(payload, (host, port))
            if not wait_reply:
                return {"sent": True, "reply": False, "error": None}
            try:
                s.recvfrom(4096)
                return {"sent": True, "reply": True, "error": None}
            except OSError as exc:
                return {"sent": True, "reply": False, "error": err_text(exc)}
    except OSError as exc:
        return {"sent": False, "reply": False, "error": err_text(exc)}


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def raw_udp(addr_text: str, payload: bytes) -> dict:
    """A hand-built IPv4/UDP datagram on a raw socket: bypasses every socket-level proxy."""
    host, port = split_addr(addr_text)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as exc:
        return {"created": False, "sent": False, "error": err_text(exc)}
    try:
        src = dst = socket.inet_aton(host)
        udp_len = 8 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0x1234, 0, 64, 17, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
        s.sendto(ip + udp, (host, 0))
        return {"created": True, "sent": True, "error": None}
    except OSError as exc:
        return {"created": True, "sent": False, "error": err_text(exc)}
    finally:
        s.close()


def resolv_nameservers() -> list[str]:
    try:
        with open("/etc/resolv.conf") as f:
            return [ln.split()[1] for ln in f if ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1]
    except OSError:
        return []


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


# --- probes ----------------------------------------------------------------------------------


def probe_egress(p: dict) -> dict:
    n = p["nonce"]
    return {
        "via_proxy": proxied_get(p, f"/egress/{n}/proxied"),
        # A destination the policy does not allow (the trap): the sidecar must answer the deny.
        "via_proxy_denied": proxied_get(dict(p, upstream=p["trap_tcp"]), f"/egress/{n}/denied"),
        "direct_trap": tcp_touch(p["trap_tcp"], f"egress-{n}".encode()),
        "direct_upstream": direct_get(p, f"/egress/{n}/direct"),
    }


def probe_dns(p: dict) -> dict:
    n = p["nonce"]
    out: dict = {
        "explicit_udp": udp_exchange(p["trap_udp"], dns_query(f"explicit-{n}.conformance.invalid"), True),
        "nameservers": resolv_nameservers(),
    }
    # Gate for the one real lookup: only when the host loopback is out of reach and every
    # configured nameserver is a loopback address (so the query cannot reach a host resolver).
    host_loop = tcp_touch(p["trap_tcp"], f"dns-gate-{n}".encode())
    out["host_loopback_reachable"] = host_loop["connected"]
    ns = out["nameservers"]
    if host_loop["connected"] or not ns or not all(is_loopback(x) for x in ns):
        out["getaddrinfo"] = {
            "ran": False,
            "why": "host loopback reachable or resolver not on loopback; no lookup sent",
        }
    else:
        name = p["dns_name"]
        try:
            addrs = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
            out["getaddrinfo"] = {"ran": True, "name": name, "addresses": [a[4][0] for a in addrs], "error": None}
        except OSError as exc:
            out["getaddrinfo"] = {"ran": True, "name": name, "addresses": [], "error": err_text(exc)}
    return out


def probe_bypass(p: dict) -> dict:
    n = p["nonce"]
    out: dict = {}
    # A child with an empty environment (env -i): no proxy variables at all.
    try:
        r = subprocess.run(
            [sys.executable, "-I", os.path.abspath(__file__), "bypass-child", json.dumps(p)],
            env={}, capture_output=True, timeout=30, check=False,
        )
        out["env_i_child"] = json.loads(r.stdout.decode() or "null") or {"error": r.stderr.decode()[-300:]}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        out["env_i_child"] = {"error": err_text(exc)}
    # This process with the proxy variables unset, using the stdlib HTTP client.
    for v in PROXY_VARS:
        os.environ.pop(v, None)
    import urllib.request  # noqa: PLC0415 - only the probe that fetches needs it

    try:
        with urllib.request.urlopen(f"http://{p['upstream']}/bypass/{n}/noproxy", timeout=IO_TIMEOUT) as resp:
            out["unset_proxy_urllib"] = {"ok": resp.status == 200, "status": resp.status, "error": None}
    except Exception as exc:  # noqa: BLE001 - any failure is the observation
        out["unset_proxy_urllib"] = {"ok": False, "status": None, "error": err_text(exc)}
    out["udp"] = udp_exchange(p["trap_udp"], f"bypass-{n}-udp".encode(), False)
    out["raw_socket"] = raw_udp(p["trap_udp"], f"bypass-{n}-raw".encode())
    if p.get("trap_tcp6"):
        out["ipv6_tcp"] = tcp_touch(p["trap_tcp6"], f"bypass-{n}-v6".encode())
    if p.get("sidecar"):
        # The policy sidecar's own port on host loopback: reaching it skips the bridge's
        # attribution. Connect only (no bytes), so the sidecar is not fed junk.
        out["sidecar_direct"] = tcp_touch(p["sidecar"], b"")
    return out


def probe_bypass_child(p: dict) -> dict:
    n = p["nonce"]
    return {
        "env_empty": not any(os.environ.get(v) for v in PROXY_VARS),
        "direct_upstream": direct_get(p, f"/bypass/{n}/child"),
        "direct_trap": tcp_touch(p["trap_tcp"], f"bypass-{n}-child".encode()),
    }


def probe_runtime(p: dict) -> dict:
    n = p["nonce"]
    out: dict[str, object] = {"before": proxied_get(p, f"/runtime/{n}/before")}
    # Hand-shake with the kit over stdio: it kills the host bridge, then says GO.
    print(f"READY {n}", flush=True)
    line = sys.stdin.readline().strip()
    out["go"] = line
    out["after"] = proxied_get(p, f"/runtime/{n}/after")
    out["direct_upstream"] = direct_get(p, f"/runtime/{n}/direct")
    out["direct_trap"] = tcp_touch(p["trap_tcp"], f"runtime-{n}".encode())
    return out


def probe_startup(p: dict) -> dict:
    return {"started": True, "pid": os.getpid()}


def probe_stdio(p: dict) -> dict:
    n = p["nonce"]
    sys.stdout.write(f"OUT-{n}\n")
    sys.stdout.flush()
    sys.stderr.write(f"ERR-{n}\n")
    sys.stderr.flush()
    line = sys.stdin.readline().strip()
    sys.stdout.write(f"IN-{line}\n")
    sys.stdout.flush()
    return {"stdin_line": line, "exit_code": 42}


def probe_signal(p: dict) -> dict:
    n = p["nonce"]
    # Block SIGTERM first and wait for it synchronously: no window where it could be missed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print(f"READY {n}", flush=True)
    info = signal.sigtimedwait({signal.SIGTERM}, 60)
    got = signal.Signals(info.si_signo).name if info else None
    return {"signal": got, "exit_code": 7 if got else 3}


def probe_signal_default(p: dict) -> dict:
    """Leaves SIGTERM at its default: the command dies of it, and the exit status must say so
    (128+15). Evidence is written first, since nothing runs after the signal."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    write_evidence(p["evidence"], {"probe": "signal-default", "nonce": p["nonce"], "phase": p["phase"],
                                   "result": {"waiting": True}, "uid": os.getuid(), "pid": os.getpid()})
    print(f"READY {p['nonce']}", flush=True)
    signal.alarm(60)  # bound the wait; SIGALRM's default also terminates (with a different code)
    while True:
        signal.pause()


PROBES = {
    "egress": probe_egress,
    "dns": probe_dns,
    "bypass": probe_bypass,
    "bypass-child": probe_bypass_child,
    "runtime": probe_runtime,
    "startup": probe_startup,
    "stdio": probe_stdio,
    "signal": probe_signal,
    "signal-default": probe_signal_default,
}


def write_evidence(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    name, params = argv[1], json.loads(argv[2])
    result = PROBES[name](params)
    if name == "bypass-child":
        print(json.dumps(result))
        return 0
    doc = {"probe": name, "nonce": params["nonce"], "phase": params["phase"], "result": result,
           "uid": os.getuid(), "pid": os.getpid()}
    write_evidence(params["evidence"], doc)
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

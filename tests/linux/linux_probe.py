"""Runs INSIDE the sandbox (stdlib only, /usr/bin/python3): tries every way out named in the
config file and writes what happened to the results file (the evidence that it ran).

Also run OUTSIDE the sandbox with the same config as the positive control."""

import json
import os
import socket
import subprocess
import sys


def attempt(fn):
    try:
        return {"ok": True, "detail": str(fn())[:300]}
    except Exception as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}


def tcp(host, port):
    s = socket.create_connection((host, port), timeout=2)
    s.sendall(b"PROBE-TCP\n")
    s.close()
    return "connected"


def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(b"PROBE-UDP", (host, port))
    data, _ = s.recvfrom(100)  # the listener echoes: a reply proves delivery
    return data


def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(path)
    s.sendall(b"PROBE-UNIX\n")
    s.close()
    return "connected"


def sh(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env)
    return {"rc": p.returncode, "out": p.stdout[-400:], "err": p.stderr[-400:]}


def main():
    cfg = json.load(open(sys.argv[1]))
    out = {"inside": os.environ.get("FIRMA_RUN_SANDBOX_ID") is not None, "pid": os.getpid()}
    host_ip = "127.0.0.1"
    out["tcp_python"] = attempt(lambda: tcp(host_ip, cfg["tcp_port"]))
    out["udp_python"] = attempt(lambda: udp(host_ip, cfg["udp_port"]))
    out["tcp_ipv6"] = attempt(lambda: tcp("::1", cfg["tcp6_port"])) if cfg.get("tcp6_port") else None
    out["bash_dev_tcp"] = sh(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{cfg['tcp_port']} && echo PROBE-BASH >&3"])
    out["curl_noproxy"] = sh(["curl", "-sS", "--noproxy", "*", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", cfg["direct_url"]])
    out["env_i_child"] = sh(["env", "-i", "/usr/bin/python3", "-c",
                             f"import socket; socket.create_connection(('127.0.0.1', {cfg['tcp_port']}), timeout=2).sendall(b'PROBE-ENVI')"])
    out["unix"] = {p: attempt(lambda p=p: unix(p)) for p in cfg["unix_paths"]}
    out["abstract"] = attempt(lambda: unix("\0" + cfg["abstract_name"]))
    out["getent"] = sh(["getent", "ahosts", cfg["dns_name"]])
    out["py_dns"] = attempt(lambda: socket.getaddrinfo(cfg["dns_name"], 80))
    out["dig"] = sh(["dig", "+tries=1", "+time=2", cfg["dns_name"]])
    out["dig_tcp"] = sh(["dig", "+tcp", "+tries=1", "+time=2", cfg["dns_name"]])
    out["host_pid_visible"] = os.path.exists(f"/proc/{cfg['host_pid']}")
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["secret_read"] = attempt(lambda: open(cfg["secret_file"]).read())
    if cfg.get("visible_file"):
        out["visible_read"] = attempt(lambda: open(cfg["visible_file"]).read())
    if cfg.get("linked_secret"):
        out["linked_secret_read"] = attempt(lambda: open(cfg["linked_secret"]).read())
    out["leak_var"] = os.environ.get(cfg["leak_var"])
    if cfg.get("allowed_url"):
        out["allowed"] = sh(["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", cfg["allowed_url"]])
        out["spoofed"] = sh(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                             "-H", "X-Firma-Sandbox-Id: sbx_forged", "-H", "x-FIRMA-agent: evil",
                             cfg["allowed_url"].rsplit("/", 1)[0] + "/spoof"])
        out["denied"] = sh(["curl", "-sS", "-m", "5", "-D", "-", cfg["denied_url"]])
        out["unset_proxy"] = sh(["env", "-u", "HTTP_PROXY", "-u", "http_proxy", "-u", "ALL_PROXY", "-u", "all_proxy",
                                 "curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", cfg["allowed_url"]])
    out["write_etc"] = attempt(lambda: open(cfg["etc_write"], "w").write("x"))
    if out["inside"]:
        out["write_resolv"] = attempt(lambda: open("/etc/resolv.conf", "a").write("nameserver 10.0.0.1\n"))
    out["unshare_net"] = sh(["unshare", "-n", "true"])
    out["unshare_user_net"] = sh(["unshare", "-Urn", "true"])
    out["ping"] = sh(["ping", "-c", "1", "-W", "1", "127.0.0.1"])
    out["state_dir_visible"] = os.path.exists(cfg["state_dir"]) and bool(os.listdir(cfg["state_dir"])) if cfg.get("state_dir") else None
    status = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Uid", "Seccomp"):
            status[k] = v.strip()
    out["status"] = status
    out["fds"] = sorted(os.listdir("/proc/self/fd"))
    out["mountinfo"] = open("/proc/self/mountinfo").read()
    out["ifaces"] = [row.split(":")[0].strip() for row in open("/proc/net/dev").read().splitlines()[2:]]
    with open(cfg["results"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()

"""End to end through the real lifecycle: `firma run --backend vz` on a host that reports macOS
(tests/macos/vz_drive.py replaces only the platform probe). The real sidecar, bridge and DNS stub
serve on host loopback; a fake sandbox-exec and a fake runner record what they were given and
probe those services, so each test shows what reached the far side."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firma.core.contract_validate import validate_contract

HERE = Path(__file__).resolve().parent
DRIVE = HERE / "vz_drive.py"
SECRET = "cap-token-must-never-appear-7c1e"

# The runner reads the host bridge and stub from its contract (its own environment is firma's
# minimal one, not the agent's).
PROBES = r'''
if [ "$1" = --launch-contract ]; then
  HTTP_PROXY=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["network"]["proxy_url"])' "$2")
  FIRMA_DNS_STUB_ADDR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["network"]["dns_stub_addr"])' "$2")
fi
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 -x "$HTTP_PROXY" http://denied.invalid/x)
echo "$code" > "$OUT/curl"
# the same bridge without this run's credential (what another local user could send)
bare=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(f"http://{p.hostname}:{p.port}")' "$HTTP_PROXY")
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 -x "$bare" http://denied.invalid/nocred)
echo "$code" > "$OUT/curl-nocred"
dig +tries=1 +time=5 -p "${FIRMA_DNS_STUB_ADDR##*:}" @"${FIRMA_DNS_STUB_ADDR%:*}" probe.invalid A \
  | sed -n 's/.*status: \([A-Z]*\).*/\1/p' > "$OUT/dig"
'''


def _require_tools():
    missing = [t for t in ("curl", "dig") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"these tests need {', '.join(missing)}; run scripts/install-system-deps.sh")


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _guest_env(tmp: Path, runner: Path) -> dict[str, str]:
    env = {"FIRMA_RUN_VZ_GUEST": "1", "FIRMA_RUN_VZ_GUEST_RUNNER": str(runner)}
    for name in ("KERNEL", "INITRD", "ROOTFS"):
        p = tmp / name.lower()
        p.write_bytes(b"\0" * 8)
        env[f"FIRMA_RUN_VZ_GUEST_{name}"] = str(p)
    return env


def _env(tmp: Path, extra: dict[str, str], sandbox_exec: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRMA_")}
    env.update({"FIRMA_STATE_DIR": str(tmp / "state"), "FIRMA_CAPABILITY_TOKEN": SECRET,
                "VZ_TEST_SANDBOX_EXEC": str(sandbox_exec) if sandbox_exec else ""})
    env.update(extra)
    return env


def _ws(tmp: Path) -> Path:
    ws = tmp / "ws"
    ws.mkdir(exist_ok=True)
    return ws


def firma(tmp: Path, args: list[str], extra: dict[str, str], sandbox_exec: Path | None = None,
          driver: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVE)] if driver else [sys.executable, "-m", "firma"]
    return subprocess.run(cmd + args, cwd=_ws(tmp), env=_env(tmp, extra, sandbox_exec),
                          capture_output=True, text=True, timeout=120)


def _proof(tmp: Path) -> dict:
    [p] = (tmp / "state" / "proofs").glob("*.json")
    return json.loads(p.read_text())


def _audit(tmp: Path) -> list[dict]:
    p = tmp / "state" / "audit.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _run_dirs(tmp: Path) -> list[Path]:
    d = tmp / "state" / "run"
    return list(d.iterdir()) if d.exists() else []


def test_guest_mode_end_to_end(tmp_path):
    _require_tools()
    out = tmp_path / "evidence"
    out.mkdir()
    runner = _script(tmp_path / "vz-runner", f'OUT="{out}"\n'
                     'printf "%s\\n" "$#" > "$OUT/argc"\n'
                     'for a in "$@"; do printf "%s\\n" "$a"; done > "$OUT/argv"\n'
                     'stat -c %a "$2" > "$OUT/mode"; stat -c %a "$(dirname "$2")" > "$OUT/dirmode"\n'
                     'cp "$2" "$OUT/contract.json"; env > "$OUT/env"\n'
                     + PROBES + "exit 42\n")
    r = firma(tmp_path, ["run", "--backend", "vz", "--", "/bin/echo", "hi"],
              _guest_env(tmp_path, runner))
    assert r.returncode == 42, r.stderr
    proof = _proof(tmp_path)
    sbx = proof["sandbox_id"]
    path = str(tmp_path / "state" / "run" / sbx / "vz-guest" / "vz-guest-launch.json")
    assert (out / "argc").read_text().strip() == "2"
    assert (out / "argv").read_text().splitlines() == ["--launch-contract", path]
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"
    text = (out / "contract.json").read_text()
    contract = json.loads(text)
    assert validate_contract(contract, file_exists=os.path.isfile) == []
    assert SECRET not in text and "FIRMA_CAPABILITY_TOKEN" not in text
    assert SECRET not in (out / "env").read_text()
    assert contract["sandbox_id"] == sbx and contract["runner"]["path"] == str(runner)
    assert contract["command"]["executable"] == "/bin/echo" and contract["command"]["args"] == ["hi"]
    assert contract["command"]["env"]["FIRMA_DNS_STUB_ADDR"] == contract["network"]["dns_stub_addr"]
    assert contract["mounts"][0] == {"source": str(_ws(tmp_path)), "target": str(_ws(tmp_path)),
                                     "read_only": False}
    # The bridge and stub named in the contract were live while the runner ran.
    assert (out / "curl").read_text().strip() == "403"
    assert (out / "dig").read_text().strip() == "REFUSED"
    denies = [e for e in _audit(tmp_path) if e["decision"] == 2 and "denied.invalid" in e["resource"]]
    assert denies and all(e["sandbox_id"] == sbx for e in denies)
    assert proof["network_confinement"] == "macos_vz_guest" and proof["structural"] is True
    assert proof["enforced"] is True and proof["exit_status"] == 42
    assert any(c["name"] == "launch_contract_private" and c["ok"] for c in proof["checks"])
    assert not os.path.exists(path) and _run_dirs(tmp_path) == []


def _fake_sandbox_exec(tmp: Path, out: Path) -> Path:
    return _script(tmp / "sandbox-exec", f'OUT="{out}"\n'
                   '[ "$1" = "-p" ] || exit 97\n'
                   'printf "%s" "$2" > "$OUT/profile"; shift 2\n'
                   'for a in "$@"; do printf "%s\\n" "$a"; done > "$OUT/argv"\n'
                   'exec "$@"\n')


def _agent(tmp: Path, out: Path, code: int) -> Path:
    return _script(tmp / "agent", f'OUT="{out}"\nenv > "$OUT/agent-env"\n'
                   + PROBES.replace('dig ', '[ -n "$FIRMA_DNS_STUB_ADDR" ] && dig ') + f"exit {code}\n")


def test_network_deny_end_to_end(tmp_path):
    _require_tools()
    out = tmp_path / "evidence"
    out.mkdir()
    sx = _fake_sandbox_exec(tmp_path, out)
    agent = _agent(tmp_path, out, 42)
    r = firma(tmp_path, ["run", "--backend", "vz", "--profile", "claude-code", "--", str(agent), "a b"],
              {"FIRMA_RUN_VZ_STRUCTURAL_NETWORK": "yes"}, sandbox_exec=sx)
    assert r.returncode == 42, r.stderr
    env = dict(row.split("=", 1) for row in (out / "agent-env").read_text().splitlines() if "=" in row)
    bridge_port = int(env["HTTP_PROXY"].rsplit(":", 1)[1])
    # macOS has no peer uid for TCP: the bridge takes only this run's credential (proxy_url userinfo)
    assert env["HTTP_PROXY"].startswith("http://firma:") and "@127.0.0.1:" in env["HTTP_PROXY"]
    assert (out / "curl-nocred").read_text().strip() == "407"
    stub_port = int(env["FIRMA_DNS_STUB_ADDR"].rsplit(":", 1)[1])
    assert env["FIRMA_DNS_STUB_ADDR"] == f"127.0.0.1:{stub_port}"
    assert SECRET not in (out / "agent-env").read_text()
    lines = (out / "profile").read_text().splitlines()
    ports = sorted({bridge_port, stub_port})
    assert lines[:4] == ["(version 1)", "(allow default)",
                         "; macOS structural: deny all outbound, allow only Firma loopback endpoints",
                         "(deny network-outbound)"]
    assert lines[4:8] == [f'(allow network-outbound (remote ip{v} "localhost:{p}"))'
                          for p in ports for v in (4, 6)]
    home = env["HOME"].rstrip("/")
    assert f'(deny file-read* (subpath "{home}/.ssh"))' in lines
    assert (out / "argv").read_text().splitlines() == [str(agent), "a b"]
    assert (out / "curl").read_text().strip() == "403"
    assert (out / "dig").read_text().strip() == "REFUSED"
    assert not [e for e in _audit(tmp_path) if "/nocred" in e["resource"]]  # refused unaudited
    # the stub cannot tell whose query it answered here: it counts them instead of auditing them
    assert not [e for e in _audit(tmp_path) if e["action"] == "dns.query"]
    proof = _proof(tmp_path)
    assert proof["network_confinement"] == "macos_sandbox_network_deny" and proof["enforced"] is True
    assert proof["exit_status"] == 42
    assert any(c["name"] == "sbpl_profile" and c["ok"] for c in proof["checks"])


def test_compatibility_needs_the_opt_in_and_then_is_proxy_only(tmp_path):
    _require_tools()
    out = tmp_path / "evidence"
    out.mkdir()
    sx = _fake_sandbox_exec(tmp_path, out)
    agent = _agent(tmp_path, out, 0)
    r = firma(tmp_path, ["run", "--backend", "vz", "--", str(agent)], {}, sandbox_exec=sx)
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert line.startswith("[ERR]  ") and "--allow-non-structural" in line
    assert "FIRMA_RUN_ALLOW_NON_STRUCTURAL" in line
    assert list(out.iterdir()) == []  # nothing started
    r = firma(tmp_path, ["run", "--backend", "vz", "--allow-non-structural", "--", str(agent)], {},
              sandbox_exec=sx)
    assert r.returncode == 0, r.stderr
    assert "proxy-only mode; agent egress is NOT mandatorily confined" in r.stderr
    profile = (out / "profile").read_text()
    assert "network" not in profile and profile.startswith("(version 1)\n(allow default)\n")
    assert "FIRMA_DNS_STUB_ADDR" not in (out / "agent-env").read_text()
    assert (out / "curl").read_text().strip() == "403"  # proxy variables point at the bridge
    proof = _proof(tmp_path)
    assert (proof["network_confinement"], proof["structural"], proof["enforced"]) == (
        "proxy_only", False, False)


@pytest.mark.parametrize("var", ["RUNNER", "KERNEL", "INITRD", "ROOTFS"])
def test_guest_input_failure_is_one_line_and_starts_nothing(tmp_path, var):
    out = tmp_path / "evidence"
    out.mkdir()
    runner = _script(tmp_path / "vz-runner", f'touch "{out}/ran"\n')
    env = _guest_env(tmp_path, runner)
    missing = str(tmp_path / "does-not-exist")
    env[f"FIRMA_RUN_VZ_GUEST_{var}"] = missing
    r = firma(tmp_path, ["run", "--backend", "vz", "--", "/bin/true"], env)
    assert r.returncode == 1
    assert r.stderr == (f"[ERR]  backend error (vz): FIRMA_RUN_VZ_GUEST_{var} does not exist: "
                        f"{missing}\n")
    assert list(out.iterdir()) == []
    assert _run_dirs(tmp_path) == [] and not (tmp_path / "state" / "proofs").exists()


def test_missing_sandbox_exec_is_refused(tmp_path):
    r = firma(tmp_path, ["run", "--backend", "vz", "--", "/bin/true"],
              {"FIRMA_RUN_VZ_STRUCTURAL_NETWORK": "1"}, sandbox_exec=None)
    assert (r.returncode, r.stderr) == (
        1, "[ERR]  backend error (vz): sandbox-exec is not installed or not executable\n")


def test_vz_on_this_linux_host_is_unsupported(tmp_path):
    r = firma(tmp_path, ["run", "--backend", "vz", "--", "/bin/true"], {"FIRMA_RUN_VZ_GUEST": "1"},
              driver=False)
    assert (r.returncode, r.stderr) == (
        1, "[ERR]  unsupported backend vz on this host: VZ backend is only available on macOS hosts\n")


def test_sigterm_to_firma_reaches_the_runner_and_its_status_comes_back(tmp_path):
    out = tmp_path / "evidence"
    out.mkdir()
    runner = _script(tmp_path / "vz-runner", f'OUT="{out}"\n'
                     'trap \'echo TERM > "$OUT/got"; exit 7\' TERM\n'
                     'cp "$2" "$OUT/contract.json"; echo $$ > "$OUT/pid"\n'
                     'while :; do sleep 0.05; done\n')
    proc = subprocess.Popen([sys.executable, str(DRIVE), "run", "--backend", "vz", "--", "/bin/true"],
                            cwd=_ws(tmp_path), env=_env(tmp_path, _guest_env(tmp_path, runner), None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "pid").exists() or not (out / "pid").read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "runner never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert (out / "got").read_text().strip() == "TERM"
    sbx = json.loads((out / "contract.json").read_text())["sandbox_id"]
    assert not (tmp_path / "state" / "run" / sbx).exists()


def test_runner_inherits_no_descriptor_beyond_stdio(tmp_path):
    # The launcher holds the sidecar, bridge and stub sockets, the audit file and run.log open
    # while the runner starts; none of them may reach it (ATTACKS C.4 #33).
    out = tmp_path / "fds.json"
    runner = tmp_path / "fd-runner"
    runner.write_text(
        f"#!{sys.executable} -I\n"
        "import json, os\n"
        "fds = {}\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"
        "        pass\n"
        f"open({str(out)!r}, 'w').write(json.dumps(fds))\n"
    )
    runner.chmod(0o755)
    r = firma(tmp_path, ["run", "--backend", "vz", "--", "/bin/true"], _guest_env(tmp_path, runner))
    assert r.returncode == 0, r.stderr
    fds = json.loads(out.read_text())
    extra = {fd: target for fd, target in fds.items()
             if fd not in ("0", "1", "2") and not target.startswith("/proc/")}
    assert extra == {}, f"descriptors leaked into the runner: {extra}"
    assert {"0", "1", "2"} <= set(fds)

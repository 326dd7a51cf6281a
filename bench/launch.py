"""Launch benchmark: median wall time of `firma run -- true` (default resource limits) and of
`firma run --limits off -- true` next to a bare `bwrap … true` with the same namespaces and, when available, Anthropic's sandbox runtime `srt -c true`, in one run, with
ratios; plus peak memory: each command's, and firma's launcher and services process while the
services serve. Goal: firma ≤ 120 ms median and ≤ 0.25 × srt.

srt is looked up on PATH, then in $FIRMA_BENCH_SRT_DIR (default /tmp/firma-bench-srt); with
--install-srt it is installed there with `npm install @anthropic-ai/sandbox-runtime`.

Runs are interleaved (one of each command per round), so a machine that slows down mid-run
slows every row alike. Two reference rows show the floor under any Python launcher built on
asyncio: the interpreter starting, and the interpreter importing asyncio. firma's bytecode is
compiled first, as an installed package's is (an editable install under
PYTHONDONTWRITEBYTECODE would otherwise recompile firma on every launch)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_MS = 120.0
GOAL_RATIO_SRT = 0.25
GOAL_LIMITS_MS = 5.0  # what the default resource limits (cgroup, rlimits) may add to a launch


def measure_once(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, int]:
    """Wall time (ms) of one run and the peak RSS (KiB) of its process tree seen by wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = (time.perf_counter() - t0) * 1000
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{argv[:3]}… failed with {p.returncode}: {p.stderr.read().decode()[-500:]}")
    return dt, ru.ru_maxrss


def measure(cases: list[tuple[str, list[str]]], cwd: str, env: dict[str, str], n: int) -> dict[str, tuple[list[float], int]]:
    """n interleaved rounds: each round runs every case once."""
    out: dict[str, tuple[list[float], int]] = {name: ([], 0) for name, _ in cases}
    for _ in range(n):
        for name, argv in cases:
            dt, rss = measure_once(argv, cwd, env)
            times, peak = out[name]
            times.append(dt)
            out[name] = (times, max(peak, rss))
    return out


def _field_kib(path: str, name: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name))


def _memory_kib(pid: int) -> tuple[int, int]:
    """(peak RSS, proportional set size now): PSS splits the pages the services process still
    shares with the launcher it was forked from, so the two PSS add up honestly."""
    return _field_kib(f"/proc/{pid}/status", "VmHWM:"), _field_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def serving_memory(firma: list[str], cwd: str, env: dict[str, str], state: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Memory of the launcher and of its services process while an agent runs and the services
    serve: `firma run -- true` ends before the services finish starting, so its row shows the
    launcher alone."""
    log = os.path.join(state, "bench-memory.log")
    p = subprocess.Popen(firma + ["--log-file", log, "run", "--", "sleep", "3"], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while "services serving" not in text:
            if time.monotonic() > deadline or p.poll() is not None:
                raise SystemExit(f"the services never reported serving: {text[-500:]}")
            time.sleep(0.05)
            text = open(log).read() if os.path.exists(log) else ""
        services = int(text.split("services process pid ")[1].split()[0])
        time.sleep(0.2)
        return _memory_kib(p.pid), _memory_kib(services)
    finally:
        p.terminate()
        p.wait(30)


def find_srt(install: bool) -> str | None:
    found = shutil.which("srt")
    if found:
        return found
    d = os.environ.get("FIRMA_BENCH_SRT_DIR", "/tmp/firma-bench-srt")
    cand = os.path.join(d, "node_modules", ".bin", "srt")
    if not os.path.exists(cand) and install and shutil.which("npm"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "@anthropic-ai/sandbox-runtime"],
                       cwd=d, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cand if os.path.exists(cand) else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=21)
    ap.add_argument("--install-srt", action="store_true")
    ap.add_argument("--firma", default=None, help="firma command (default: the firma script next to this python)")
    ap.add_argument("--baseline", default=None, metavar="CMD",
                    help="a second firma command (e.g. another checkout's venv/bin/firma), measured in the same "
                         "interleaved rounds; prints the median of the per-round ratios firma / baseline")
    args = ap.parse_args()

    ws = tempfile.mkdtemp(prefix="firma-bench-ws-")
    state = tempfile.mkdtemp(prefix="firma-bench-state-")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "FIRMA_STATE_DIR": state}
    # The console script users run (next to this interpreter), else `python -m firma`.
    script = os.path.join(os.path.dirname(sys.executable), "firma")
    default = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "firma"]
    firma = args.firma.split() if args.firma else default
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        print("bwrap is not installed")
        return 1
    uid = ["--uid", "1000", "--gid", "1000"] if os.getuid() == 0 else []
    bare = [bwrap, "--unshare-user", *uid, "--disable-userns", "--unshare-net", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "--", "true"]
    import compileall

    import firma as firma_pkg

    compileall.compile_dir(os.path.dirname(firma_pkg.__file__), quiet=1)
    py = os.path.join(os.path.dirname(sys.executable), "python")
    floors = [("python -c pass (interpreter start)", [py, "-c", "pass"]),
              ("python: import asyncio (floor; as firma: no ssl/GC)",
               [py, "-c", "import sys, gc; sys.modules['ssl'] = None; gc.disable(); import asyncio"])]
    limits_off_name = "firma run --limits off -- true"
    cases = [("bare bwrap … true (same namespaces)", bare), ("firma run -- true", firma + ["run", "--", "true"]),
             (limits_off_name, firma + ["run", "--limits", "off", "--", "true"])]
    baseline_name = "baseline firma run -- true"
    if args.baseline:
        cases.append((baseline_name, args.baseline.split() + ["run", "--", "true"]))
    srt = find_srt(args.install_srt)
    srt_name = "srt -c true (@anthropic-ai/sandbox-runtime)"
    if srt:
        cases.append((srt_name, [srt, "-c", "true"]))
    cases += floors
    # warm-up (page cache, seccomp artifact compiled once)
    for name, argv in list(cases):
        try:
            measure([(name, argv)], ws, env, 2)
        except SystemExit as exc:
            if argv[0] != srt:
                raise
            print(f"srt found but it does not run here ({str(exc)[-200:].strip()}); ratio vs srt not measured")
            cases.remove((name, argv))
            srt = None
    results = {}
    measured = measure(cases, ws, env, args.n)
    for name, (times, peak) in measured.items():
        results[name] = (statistics.median(times), min(times), max(times), peak)
    base = results[cases[0][0]][0]
    srt_med = results[srt_name][0] if srt else None
    print(f"launch benchmark: {args.n} interleaved rounds, uid={os.getuid()}, {os.cpu_count()} CPUs")
    hdr = f"{'command':<48} {'median ms':>10} {'min':>7} {'max':>7} {'× bare':>7} {'× srt':>7} {'peak RSS MiB':>13}"
    print(hdr)
    print("-" * len(hdr))
    for name, _ in cases:
        med, lo, hi, peak = results[name]
        r_srt = f"{med / srt_med:7.2f}" if srt_med else "    n/a"
        print(f"{name:<48} {med:10.1f} {lo:7.1f} {hi:7.1f} {med / base:7.2f} {r_srt} {peak / 1024:13.1f}")
    fmed = results["firma run -- true"][0]
    print()
    print(f"goal: firma median ≤ {GOAL_MS:.0f} ms: {'MET' if fmed <= GOAL_MS else 'NOT MET'} ({fmed:.1f} ms)")
    if srt_med:
        ratio = fmed / srt_med
        print(f"goal: firma ≤ {GOAL_RATIO_SRT} × srt: {'MET' if ratio <= GOAL_RATIO_SRT else 'NOT MET'} ({ratio:.2f} ×)")
    else:
        print("srt not found (run with --install-srt to fetch it with npm); ratio vs srt not measured")
    # Limits on (the default) against off, paired by round.
    diffs = [a - b for a, b in zip(measured["firma run -- true"][0], measured[limits_off_name][0], strict=True)]
    added = statistics.median(diffs)
    print(f"limits on − off, median of {len(diffs)} per-round differences: {added:+.1f} ms "
          f"(goal ≤ {GOAL_LIMITS_MS:.0f} ms: {'MET' if added <= GOAL_LIMITS_MS else 'NOT MET'})")
    if args.baseline:
        # Pair by round: both ran back to back, so a machine that drifts moves both alike.
        ratios = [a / b for a, b in zip(measured["firma run -- true"][0], measured[baseline_name][0], strict=True)]
        print(f"firma / baseline, median of {len(ratios)} per-round ratios: {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print("peak RSS is the largest process of the command's tree as reported by wait4 (ru_maxrss)")
    (l_hwm, l_pss), (s_hwm, s_pss) = serving_memory(firma, ws, env, state)
    print(f"firma while its services serve (`firma run -- sleep 3`): peak RSS launcher {l_hwm / 1024:.1f} MiB, "
          f"services process {s_hwm / 1024:.1f} MiB; PSS together {(l_pss + s_pss) / 1024:.1f} MiB")
    shutil.rmtree(ws, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

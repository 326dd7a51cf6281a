"""Post-run workspace check benchmark: the scan of a 100k-file tree (a few thousand directories,
a nested git repository with an index) next to a plain `os.walk` + `lstat` of the same tree, in
the same run, interleaved; median of N runs and the ratio. Two scan rows: after a run that
changed nothing (baseline after the tree was built: the usual case) and after a run that wrote
every file (baseline before: each file is then also checked for setuid bits and capabilities).

    python bench/workspace_check.py [--files 100000] [--runs 7]"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from firma.core.model import Identity, RunPlan
from firma.run import workspace_check as wc


def build_tree(root: Path, files: int, per_dir: int = 30) -> None:
    dirs = max(1, files // per_dir)
    for d in range(dirs):
        sub = root / f"pkg{d // 100:03d}" / f"mod{d:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(per_dir):
            (sub / f"file{f:02d}.py").write_bytes(b"x = 1\n")
    nested = root / "vendor" / "lib"
    nested.mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root.parent), "GIT_CONFIG_NOSYSTEM": "1"}
    for i in range(200):
        (nested / f"n{i}.c").write_bytes(b"int x;\n")
    subprocess.run(["git", "init", "-q"], cwd=nested, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=nested, env=env, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "x"],
                   cwd=nested, env=env, check=True)


def plain_walk(root: str) -> int:
    n = 0
    for d, dirs, names in os.walk(root):
        for name in dirs + names:
            os.lstat(os.path.join(d, name))
            n += 1
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="firma-bench-ws-") as tmp:
        root = Path(tmp) / "ws"
        run_dir = Path(tmp) / "run"
        run_dir.mkdir(mode=0o700)
        root.mkdir()
        plan = RunPlan(identity=Identity("sbx_bench", "s", "generic", "a", "u"), backend="bwrap", argv=("x",),
                       cwd=str(root), home=str(Path(tmp) / "home"), state_root=tmp)
        before = wc.take_baseline(plan, str(run_dir))
        build_tree(root, args.files)
        os.unlink(run_dir / "workspace-baseline")
        after = wc.take_baseline(plan, str(run_dir))
        entries = plain_walk(str(root))
        rows: dict[str, list[float]] = {"os.walk + lstat": [], "scan, nothing new": [], "scan, every file new": []}
        for _ in range(args.runs):
            rows["os.walk + lstat"].append(timed(lambda: plain_walk(str(root))))
            rows["scan, nothing new"].append(timed(lambda: wc.scan(plan, after)))
            rows["scan, every file new"].append(timed(lambda: wc.scan(plan, before)))
        findings = len(wc.scan(plan, before).findings)
    base = statistics.median(rows["os.walk + lstat"])
    print(f"tree: {entries} entries, {args.runs} runs (median); findings on the all-new scan: {findings}")
    print(f"{'':24} {'median ms':>10} {'ratio':>7}")
    for name, values in rows.items():
        m = statistics.median(values)
        print(f"{name:24} {m:10.1f} {m / base:7.2f}")


if __name__ == "__main__":
    main()

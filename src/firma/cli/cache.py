"""`firma cache list | clear`: the tool caches kept between runs (DESIGN §5.6), per workspace.

`list` shows each workspace's caches and their sizes (links are counted, never followed);
`clear` removes this workspace's caches (or only the named ones), `clear --all` every
workspace's. What an agent left in a cache is never run or read here."""

from __future__ import annotations

import json
import os
import shutil

from ..core import caches
from ..host import detect_host


def add_parser(sub):
    p = sub.add_parser("cache", help="list or clear the tool caches kept between runs")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    ls = csub.add_parser("list", help="each workspace's kept caches and their sizes")
    ls.add_argument("--json", action="store_true", help="one JSON object per workspace")
    cl = csub.add_parser("clear", help="remove this workspace's kept caches")
    cl.add_argument("names", nargs="*", metavar="NAME", help="only these caches (pip, npm, ...)")
    cl.add_argument("--all", action="store_true", help="every workspace's caches")
    return p


def _size(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for n in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run(args) -> int:
    host = detect_host()
    root = caches.cache_root(host.environ)
    if root is None:
        print("[ERR]  no cache root: set HOME or XDG_CACHE_HOME")
        return 1
    if args.cache_cmd == "list":
        try:
            workspaces = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            workspaces = []
        if not workspaces and not args.json:
            print(f"no kept caches under {root}")
        for ws in sorted(workspaces, key=lambda e: e.name):
            sizes = {e.name: _size(e.path) for e in os.scandir(ws.path) if e.is_dir(follow_symlinks=False)}
            if args.json:
                print(json.dumps({"workspace": ws.name, "path": ws.path, "caches": sizes}))
            else:
                print(f"{ws.name}  " + ", ".join(f"{n} {_fmt(s)}" for n, s in sorted(sizes.items())))
        return 0
    for n in args.names:
        if n not in caches.KNOWN:
            print(f"[ERR]  unknown cache '{n}'; known: {', '.join(caches.KNOWN)}")
            return 1
    if args.all:
        targets = [root]
    else:
        base = os.path.join(root, caches.workspace_key(os.path.normpath(os.getcwd())))  # as `firma run` keys it
        targets = [os.path.join(base, n) for n in args.names] if args.names else [base]
    removed = 0
    for t in targets:
        if os.path.lexists(t):
            if os.path.islink(t) or not os.path.isdir(t):
                os.unlink(t)
            else:
                shutil.rmtree(t)  # descriptor-based on Linux: never follows a link the agent left
            removed += 1
    print(f"removed {removed} cache director{'y' if removed == 1 else 'ies'}" + ("" if removed else " (none kept)"))
    return 0

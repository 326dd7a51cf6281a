"""`firma trust [CONFIG]`, `firma trust --show`, `firma trust --revoke [CONFIG]` (DESIGN §15).

Trusting a project config records its sha256 and that of every file it references (Cedar
policy, seccomp source) in `$XDG_CONFIG_HOME/firma/trust.toml`; any later change withdraws the
trust until the user reviews it and trusts it again."""

from __future__ import annotations

import hashlib
import os
import sys
import time

from .. import configfiles, privfs
from ..core import configtrust as trust
from ..core import settings
from ..errors import ConfigError
from ..host import detect_host


def add_parser(sub):
    p = sub.add_parser(
        "trust",
        help="let a project's .firma/firma.toml widen the sandbox (pinned by its hash)",
        description="Record that you reviewed a project config: its widening keys then apply, "
        "until it or a file it references changes.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="the project config (default: the one found from here)")
    p.add_argument("--show", action="store_true", help="list the trusted configs and whether each still matches")
    p.add_argument("--revoke", action="store_true", help="withdraw the trust of CONFIG")
    return p


def _target(args, env, cwd: str) -> str:
    if args.config:
        return os.path.normpath(os.path.join(cwd, args.config))
    found = settings.project_config(env, cwd, os.path.isfile)
    if found is None:
        raise ConfigError(f"no {settings.CONFIG_DIR}/{settings.CONFIG_NAME} found from {cwd} up; name the file to trust")
    return found


def _write(env, entries) -> str:
    path = configfiles.trust_path(env)
    if path is None:
        raise ConfigError("cannot locate the user config directory: set HOME or XDG_CONFIG_HOME")
    privfs.ensure_dir(os.path.dirname(path))
    privfs.write_private(path, trust.render_trust(entries))
    return path


def run(args) -> int:
    host = detect_host()
    env = host.environ
    cwd = os.getcwd()
    entries = configfiles.read_trust(env)
    if args.show:
        if not entries:
            print("no trusted project configs")
        for path, e in sorted(entries.items()):
            try:
                data, _ = privfs.read_private(path, configfiles.MAX_CONFIG_BYTES, what="project config")


                sha = hashlib.sha256(data).hexdigest()
                files = {p: configfiles.file_sha256(p) for p in e.files}
                _, state = trust.verdict(e, sha, files)
            except (OSError, privfs.PrivatePathError) as exc:
                state = f"cannot be read: {exc}"
            refs = f" (+{len(e.files)} referenced file{'s' if len(e.files) != 1 else ''})" if e.files else ""
            print(f"{path}{refs}: {state}")
        return 0
    target = _target(args, env, cwd)
    if args.revoke:
        if entries.pop(target, None) is None:
            raise ConfigError(f"{target} is not trusted; `firma trust --show` lists what is")
        _write(env, entries)
        print(f"trust withdrawn: {target}")
        return 0
    # Read exactly as `firma run` would name it explicitly: the private-path rule, then parse.
    loaded = configfiles.load(target, env, cwd)
    cfg, source = loaded.files[-1][0], loaded.sources[-1]
    sha = source.sha256 or ""
    files = {p: configfiles.file_sha256(p) for p in trust.referenced_files(cfg)}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entries[target] = trust.TrustEntry(target, sha, files, stamp)
    written = _write(env, entries)
    refs = "".join(f"\n  pinned: {p}" for p in files)
    print(f"trusted: {target} (sha256 {sha[:16]}…){refs}\nrecorded in {written}", file=sys.stdout)
    return 0

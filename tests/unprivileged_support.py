"""Running firma as an unprivileged test user (shared by tests/linux and tests/runner).

/root is 0700 here and firma's venv may live under it, so firma's source and the site-packages it
needs are copied into a world-readable temp dir and run with the system /usr/bin/python3.11 as
the user `firma-test`. Started as root, which creates the user; every failure to set that up
FAILS the test (it never skips)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "firma-test"
PY = "/usr/bin/python3.11"
PACKAGES = ("cedarpy", "cryptography", "cffi", "pyseccomp.py", "idna")


def ensure_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.fail("the unprivileged-user tests must be started as root (they create the test user)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    p = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       capture_output=True, text=True)
    if p.returncode != 0 and "already exists" not in p.stderr:
        pytest.fail(f"cannot create test user {USER}: {p.stderr.strip()}")
    return pwd.getpwnam(USER)


@dataclass(frozen=True)
class UserInstall:
    root: Path  # world-readable; firma and its dependencies under root/lib
    user: pwd.struct_passwd
    home: Path  # owned by the user

    @property
    def pythonpath(self) -> str:
        return f"{self.root}/lib"

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "LOGNAME": USER, "PYTHONPATH": self.pythonpath}
        env.update(extra)
        return env

    def argv(self, *cmd: str) -> list[str]:
        """cmd as the test user, with no groups and no capabilities."""
        u = self.user
        return ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--inh-caps=-all", *cmd]


def make_install(prefix: str, *, extra_tree: Path | None = None) -> UserInstall:
    """Copy firma (and optionally a test helper tree, as root/tests) somewhere the user can read."""
    for tool in ("bwrap", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required; run scripts/install-system-deps.sh")
    if not os.access(PY, os.X_OK):
        pytest.fail(f"{PY} is needed to run firma as an unprivileged user")
    user = ensure_user()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    import cedarpy

    import firma

    shutil.copytree(Path(firma.__file__).resolve().parent, root / "lib" / "firma",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = Path(cedarpy.__file__).resolve().parents[1]
    for name in PACKAGES:
        s = site / name
        (shutil.copytree if s.is_dir() else shutil.copy)(s, root / "lib" / name)
    for so in site.glob("_cffi_backend*.so"):
        shutil.copy(so, root / "lib" / so.name)
    if extra_tree is not None:
        shutil.copytree(extra_tree, root / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    home = root / "home"
    home.mkdir()
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    return UserInstall(root=root, user=user, home=home)


def remove_install(inst: UserInstall) -> None:
    shutil.rmtree(inst.root, ignore_errors=True)
    shutil.rmtree(f"/tmp/firma-{inst.user.pw_uid}", ignore_errors=True)


def as_user(uid: int, gid: int, fn):
    """Run fn() in a forked child that became `uid`/`gid` (no supplementary groups); its
    JSON-able result comes back through a pipe, an exception as {"error": repr}. Load what fn
    needs (encodings.idna for socket names) before calling: the venv may be unreadable to `uid`."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                result = fn()
            except Exception as exc:
                result = {"error": repr(exc)}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)

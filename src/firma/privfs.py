"""Private paths: every directory and file firma creates or trusts goes through this module
(DESIGN §14), one named policy per operation.

The rule:
- the final component is never followed when it is a symlink (O_NOFOLLOW, or lstat and refuse);
- every ancestor directory (of the resolved path, so a symlinked /tmp or home keeps working) is
  owned by root or the caller and not writable by group or others — a root-owned sticky directory
  such as /tmp is accepted as an ancestor, and as the direct parent only of a directory firma
  itself owns (its state root), never of a file firma reads as trusted;
- directories firma creates are 0700, files 0600, created with O_EXCL or temp + rename in the same
  directory;
- an existing directory or file not owned by the caller is refused with one line.

An existing directory of the caller's with any group or other bits is refused rather than
tightened: firma cannot know what others read or placed there meanwhile (`firma doctor` names the
same fix). Only the caller's own append-only files (logs) are tightened in place.

No asyncio and no heavy imports here: the launcher's hot path uses it."""

from __future__ import annotations

import errno
import os
import stat

from .errors import FirmaError


class PrivatePathError(FirmaError):
    """A path firma writes or trusts is not private to the caller."""


def _uid() -> int:
    return os.geteuid()


def check_ancestors(directory: str, *, sticky_parent: bool) -> None:
    """Every directory from / down to `directory` (resolved) is owned by root or the caller and
    not writable by group or others; a root-owned sticky directory is accepted, as `directory`
    itself only when `sticky_parent` is true."""
    real = os.path.realpath(directory)
    uid = _uid()
    path = "/"
    parts = [p for p in real.split("/") if p]
    for i in range(len(parts) + 1):
        if i:
            path = os.path.join(path, parts[i - 1])
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise PrivatePathError(f"cannot inspect {path}: {exc.strerror}; check the path") from None
        if st.st_uid not in (0, uid):
            raise PrivatePathError(
                f"{path} is owned by uid {st.st_uid}, not by you or root; firma does not trust paths "
                "under it: choose a directory you own"
            )
        if st.st_mode & 0o022:
            sticky_ok = st.st_uid == 0 and st.st_mode & stat.S_ISVTX and (i < len(parts) or sticky_parent)
            if not sticky_ok:
                raise PrivatePathError(
                    f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); firma does "
                    "not trust paths under it: choose a directory only you can write"
                )


def _check_own_dir(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise PrivatePathError(f"{path} is a symlink; firma never follows one here: remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise PrivatePathError(f"{path} is not a directory; remove it or choose another path")
    if st.st_uid != _uid():
        raise PrivatePathError(f"{path} is owned by uid {st.st_uid}, not you; remove it or choose another path")
    if st.st_mode & 0o077:
        raise PrivatePathError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 (chmod 700 it or remove it)"
        )


def ensure_dir(path: str) -> None:
    """Policy `ensure_dir`: `path` exists afterwards as a directory of the caller's, 0700; missing
    components are created 0700; its ancestors pass `check_ancestors`."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if parent != path:
            ensure_parent_of_dir(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # a concurrent launcher made it: checked below like any existing one
        except OSError as exc:
            raise PrivatePathError(f"cannot create directory {path}: {exc.strerror}; choose another path") from None
        st = os.lstat(path)
    except OSError as exc:
        raise PrivatePathError(f"cannot inspect directory {path}: {exc.strerror}") from None
    _check_own_dir(path, st)
    check_ancestors(parent, sticky_parent=True)


def ensure_parent_of_dir(parent: str) -> None:
    """The parent of a directory firma creates: itself created privately when missing, else an
    existing directory that passes the ancestor rule (it need not be the caller's: /tmp, $HOME)."""
    if os.path.isdir(parent):
        check_ancestors(parent, sticky_parent=True)
    else:
        ensure_dir(parent)


def _dir_of_trusted(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    check_ancestors(directory, sticky_parent=False)
    return directory


def private_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """Policy `private_temp`: a new 0600 file with a random name in `directory`, open read-write:
    (fd, path). Like tempfile.mkstemp, whose import costs a launch ~2 ms."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private(path: str, data: str | bytes) -> None:
    """Policy `write_private`: replace `path` atomically (temp + rename in the same directory) with
    a 0600 file; a symlink at `path` is replaced, never followed; ancestors are checked."""
    directory = _dir_of_trusted(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = private_temp(directory, ".tmp-", ".part")
    try:
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def create_new(path: str, data: str | bytes, mode: int = 0o600) -> None:
    """Policy `create_new`: a file that must not exist yet (O_CREAT|O_EXCL|O_NOFOLLOW) with `mode`,
    in a directory that passes the ancestor rule. FileExistsError when something is there."""
    _dir_of_trusted(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits; it never adds any
        _write_all(fd, raw)
    finally:
        os.close(fd)


def open_append(path: str) -> int:
    """Policy `open_append`: a descriptor appending to `path` (logs, the audit log): created 0600;
    a symlink or a file of another user's is refused; a loose mode of the caller's own file is
    tightened. Raises OSError (with a PrivatePathError for ownership and ancestors)."""
    _dir_of_trusted(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivatePathError(f"{path} is not a regular file; remove it or choose another path")
        if st.st_uid != _uid():
            raise PrivatePathError(f"{path} is owned by uid {st.st_uid}, not you; remove it or choose another path")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str, limit: int, *, what: str = "file", mode_checked_by_caller: bool = False) -> tuple[bytes, int]:
    """Policy `read_private`: (bytes, st_mode) of one open file — never through a final symlink,
    owned by the caller or root, not writable by others, in a directory that passes the ancestor
    rule. A non-regular file returns (b"", mode) so callers can report its kind. A caller that
    reports a loose mode itself (the launch contract validator lists it with the other problems)
    passes `mode_checked_by_caller`. Raises FileNotFoundError when there is no such file, else
    PrivatePathError (one line)."""
    try:
        _dir_of_trusted(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise  # callers tell "absent" from "refused"
    except OSError as exc:
        raise PrivatePathError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", st.st_mode
        if st.st_uid not in (0, _uid()):
            raise PrivatePathError(f"{what} {path} is owned by uid {st.st_uid}, not by you or root; refusing to read it")
        if st.st_mode & 0o022 and not mode_checked_by_caller:
            raise PrivatePathError(
                f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w it"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise PrivatePathError(f"{what} {path} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks), st.st_mode
    except OSError as exc:
        raise PrivatePathError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Policy `remove_tree`: remove a run directory. Its files are unlinked through a descriptor of
    the directory (no path re-resolution; symlinks removed, never followed); anything else falls
    back to shutil.rmtree (imported only then: ~3 ms of a launch)."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    nested = False
    try:
        for entry in os.scandir(dfd):
            try:
                if entry.is_dir(follow_symlinks=False):
                    nested = True
                else:
                    os.unlink(entry.name, dir_fd=dfd)
            except OSError:
                nested = True
    finally:
        os.close(dfd)
    try:
        os.rmdir(path)
    except OSError:
        nested = True
    if nested:
        import shutil  # noqa: PLC0415 - rare: a run dir holds only files

        shutil.rmtree(path, ignore_errors=True)


def refuse_links_within(path: str, root: str) -> None:
    """Policy `refuse_links_within`: no component of `path` between `root` (a workspace, which
    the agent can write) and `path` itself is a symlink. Components above `root` may be links (a
    symlinked /tmp or home is fine); below it a link could have been planted by an earlier run."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    if not path.startswith(root.rstrip("/") + "/"):
        return
    parts = os.path.relpath(path, root).split("/")
    cur = root
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return  # created later, privately, by whoever writes there
        if stat.S_ISLNK(st.st_mode):
            raise PrivatePathError(
                f"{cur} is a symlink inside the workspace; firma does not write through it: remove it or choose another path"
            )


class PinnedDir:
    """A directory resolved once, before the agent runs: later writes walk to exactly this real
    path, one component at a time without following links, so a directory swapped for a link
    meanwhile makes the write fail instead of landing where the link points. (A plain class:
    dataclasses would cost this hot-path module ~8 ms of imports.)"""

    __slots__ = ("real",)

    def __init__(self, real: str) -> None:
        self.real = real


def pin_dir_of(path: str) -> PinnedDir:
    """Policy `pin_dir_of`: the real directory `path` will be written in, checked now."""
    directory = os.path.dirname(os.path.abspath(path))
    check_ancestors(directory, sticky_parent=False)
    return PinnedDir(os.path.realpath(directory))


def _open_pinned(pinned: PinnedDir) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for part in [p for p in pinned.real.split("/") if p]:
            nfd = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if st.st_uid not in (0, _uid()) or (st.st_mode & 0o022 and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX)):
            raise PrivatePathError(f"{pinned.real} changed owner or mode since the run started; not writing there")
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_private_pinned(pinned: PinnedDir, name: str, data: str | bytes) -> None:
    """Policy `write_private_pinned`: `write_private` into a pinned directory, through its
    descriptor: temp + rename relative to it, the final name never followed."""
    try:
        dfd = _open_pinned(pinned)
    except OSError as exc:
        raise PrivatePathError(
            f"{pinned.real} is no longer the directory it was when the run started ({exc.strerror}); not writing {name} there"
        ) from None
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        tmp = f".tmp-{os.urandom(6).hex()}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                _write_all(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)


def read_regular(path: str, limit: int) -> bytes | None:
    """Policy `read_regular`: a regular file's first `limit` bytes, never through a final symlink;
    None for anything else or any error (for reading what the agent may have written)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)

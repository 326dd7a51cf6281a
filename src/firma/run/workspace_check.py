"""The post-run workspace check (DESIGN §13a): what the agent left in the workspace (and in the
home paths its profile made writable) that would run code on the host later, unseen.

Paths that exist at launch are bound read-only (WORKSPACE_PROTECTED); paths the agent creates
cannot be, so firma looks once the agent and everything it started are gone. At launch, before
the release, `take_baseline` records a ctime baseline, a private copy of the workspace's
.git/index and the agent settings files under the writable home paths; after teardown `scan`
walks the workspace once. "New" means ctime >= baseline: ctime is set by the kernel on every
change of a file's content, mode, owner, links or name, and cannot be set back by the agent
(utimensat sets atime and mtime only).

The scanner reads and never runs: no git subprocess, no hook, nothing from the workspace. It
never follows a symlink the agent could have planted: the walk uses lstat and does not descend
into symlinked directories, files are opened with O_NOFOLLOW, and a path taken from a file's
content (gitdir:, include.path, core.hooksPath) is used only when it resolves, without any
symlink on the way, to itself inside the workspace."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from .. import privfs
from ..core import gitconfig, gitindex
from ..core import workspace_findings as wf
from ..core.bwrap_plan import GIT_CONFIG_MAX, GIT_DIR
from ..core.model import Check, RunPlan
from ..core.record import field, record
from ..core.statelayout import LAUNCH_INDEX, WORKSPACE_BASELINE
from ..core.workspace_findings import Finding

if TYPE_CHECKING:
    from .record import RunRecord

INDEX_MAX = 1 << 30  # bytes of .git/index copied at launch (a 1M-file repository's is ~100 MiB)
GITFILE_MAX = 4096
HOME_FILE_MAX = 1 << 20
HOME_SUFFIXES = (".json", ".toml")
HOME_DEPTH = 3
HOME_FILES_MAX = 256
INCLUDE_DEPTH = 4
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID
_CAPABILITY_XATTR = "security.capability"


@record
class Limits:
    """Bounds against a pathological tree: reaching one is itself a finding (fail closed)."""

    max_entries: int = 5_000_000
    max_depth: int = 256


@record
class Baseline:
    ctime_ns: int
    index_copy: str | None  # the launch copy of <workspace>/.git/index in the run dir
    home_files: Mapping[str, bytes] = field(default_factory=dict)  # agent settings at launch


@record
class ScanResult:
    findings: tuple[Finding, ...]
    scanned: int  # workspace entries looked at


# --- at launch -------------------------------------------------------------------------------


def take_baseline(plan: RunPlan, run_dir: str) -> Baseline:
    """Call before the agent is released. The baseline is the ctime of a file created here now,
    not the clock: the kernel stamps ctime from its coarse clock (one tick, up to ~10 ms, behind
    time.time_ns()), so a file the agent writes right after the release could carry a ctime
    earlier than a clock reading taken before it. A file created now is stamped by the same
    clock as every later change, so every change the agent makes has ctime >= it."""
    marker = os.path.join(run_dir, WORKSPACE_BASELINE)
    privfs.create_new(marker, b"")
    ctime_ns = os.lstat(marker).st_ctime_ns
    index_copy = None
    data = _read_regular(os.path.join(plan.cwd, GIT_DIR, "index"), INDEX_MAX)
    if data is not None:
        index_copy = os.path.join(run_dir, LAUNCH_INDEX)
        privfs.create_new(index_copy, data)
    home = {p: data for p, data in _home_settings(plan) if data is not None}
    return Baseline(ctime_ns=ctime_ns, index_copy=index_copy, home_files=home)


# --- small safe readers ----------------------------------------------------------------------


_read_regular = privfs.read_regular


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --- the workspace walk ----------------------------------------------------------------------


class _Scan:
    def __init__(self, workspace: str, baseline: Baseline, limits: Limits) -> None:
        self.ws = os.path.realpath(workspace)
        self.base = baseline.ctime_ns
        self.baseline = baseline
        self.limits = limits
        self.findings: dict[tuple[str, str, str], Finding] = {}
        self.git_dirs: dict[str, str] = {}  # git dir -> its worktree (itself when bare)
        self.gitfiles: list[str] = []  # `.git` files (gitdir: pointers)
        self.scanned = 0
        self.stopped = False

    def add(self, kind: str, path: str, detail: str, remedy: str) -> None:
        self.findings.setdefault((kind, path, detail), Finding(kind, path, detail, remedy))

    def new(self, st: os.stat_result) -> bool:
        return st.st_ctime_ns >= self.base

    def inside(self, path: str) -> str | None:
        """`path` normalized, when it lies in the workspace with no symlink on the way."""
        p = os.path.normpath(path)
        if not _within(p, self.ws) or os.path.realpath(p) != p:
            return None
        return p

    # The one pass over the tree.
    def walk(self) -> None:
        stack: list[tuple[str, int, str | None]] = [(self.ws, 0, None)]
        while stack and not self.stopped:
            directory, depth, tool_dir = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except OSError:
                continue
            names = {e.name for e in entries}
            is_git_dir = os.path.basename(directory) == GIT_DIR or "HEAD" in names
            if is_git_dir:
                worktree = os.path.dirname(directory) if os.path.basename(directory) == GIT_DIR else directory
                self.git_dirs.setdefault(directory, worktree)
            for entry in entries:
                self.scanned += 1
                if self.scanned > self.limits.max_entries:
                    self.stop(f"stopped after {self.limits.max_entries} entries")
                    return
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = entry.path
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    if is_git_dir and entry.name == "objects":
                        continue  # object storage: large, and git runs nothing from it
                    if depth + 1 > self.limits.max_depth:
                        self.stop(f"directory depth over {self.limits.max_depth} at {path}")
                        return
                    if self.new(st) and mode & stat.S_IWOTH:
                        self.add(wf.WORLD_WRITABLE, path, "new world-writable directory", f"chmod o-w {path}")
                    sub_tool = tool_dir or (path if entry.name in wf.TOOL_CONFIG_NAMES else None)
                    stack.append((path, depth + 1, sub_tool))
                    continue
                if entry.name == GIT_DIR and stat.S_ISREG(mode):
                    self.gitfiles.append(path)
                if self.new(st):
                    self.new_file(path, entry.name, st, tool_dir)

    def stop(self, why: str) -> None:
        self.stopped = True
        self.add(wf.INCOMPLETE, self.ws, f"the workspace check {why}; files past that point were not checked",
                 "review what the agent changed by hand (find -newer, git status only after checking .git)")

    def new_file(self, path: str, name: str, st: os.stat_result, tool_dir: str | None) -> None:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if mode & _SPECIAL_BITS:
                bits = "setuid" if mode & stat.S_ISUID else "setgid"
                self.add(wf.SETUID, path, f"new {bits} file (mode {stat.S_IMODE(mode):04o})", f"chmod u-s,g-s {path} or rm {path}")
            if mode & stat.S_IWOTH:
                self.add(wf.WORLD_WRITABLE, path, "new world-writable file", f"chmod o-w {path}")
            if _has_capability(path):
                self.add(wf.CAPABILITY, path, "new file with file capabilities (security.capability)",
                         f"setcap -r {path} or rm {path}")
        if tool_dir is not None or name in wf.TOOL_CONFIG_NAMES:
            what = "symlink" if stat.S_ISLNK(mode) else "file"
            where = f" in {tool_dir}" if tool_dir is not None and tool_dir != path else ""
            self.add(wf.TOOL_CONFIG, path, f"new tool config {what}{where}: the tool may run a program from it",
                     f"review it, then rm {path}")

    # --- git, after the walk: every git dir found, their configs, hooks and indexes -----------

    def git(self) -> None:
        for gitfile in self.gitfiles:
            target = _gitfile_target(gitfile)
            if target is not None and (t := self.inside(target)) is not None and os.path.isdir(t):
                self.git_dirs.setdefault(t, os.path.dirname(gitfile))
        top = os.path.join(self.ws, GIT_DIR)
        if stat.S_ISDIR((_lstat(top) or _NO_STAT).st_mode):
            self.git_dirs.setdefault(top, self.ws)
        reachable: dict[str, str] = {}  # git dir -> the new gitlink that reaches it
        for gd, worktree in list(self.git_dirs.items()):
            for link in self.new_gitlinks(gd, top):
                for nested in self.gitlink_git_dirs(gd, worktree, link):
                    reachable.setdefault(nested, link)
                    self.git_dirs.setdefault(nested, os.path.join(worktree, link))
        for gd, worktree in self.git_dirs.items():
            self.git_dir(gd, worktree, reachable.get(gd))

    def new_gitlinks(self, gd: str, top: str) -> Iterator[str]:
        try:
            names = [n for n in os.listdir(gd) if n == "index" or n.startswith("sharedindex.")]
        except OSError:
            return
        hash_size = gitconfig.object_hash_size(gitconfig.entries(_text(_read_regular(os.path.join(gd, "config"), GIT_CONFIG_MAX) or b"")))
        for name in names:
            path = os.path.join(gd, name)
            st = _lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode) or not self.new(st):
                continue
            links = self.parse_index(path, hash_size)
            if links is None:
                continue
            old: frozenset[str] = frozenset()
            if gd == top and name == "index" and self.baseline.index_copy is not None:
                data = _read_regular(self.baseline.index_copy, INDEX_MAX) or b""
                try:
                    old = frozenset(gitindex.gitlinks(data, hash_size).gitlinks)
                except gitindex.IndexFormatError:
                    pass
            yield from (link for link in links if link not in old)

    def parse_index(self, path: str, hash_size: int) -> tuple[str, ...] | None:
        data = _read_regular(path, INDEX_MAX)
        if data is None:
            return None
        try:
            return gitindex.gitlinks(data, hash_size).gitlinks
        except gitindex.IndexFormatError as exc:
            self.add(wf.GIT_INDEX, path, f"changed git index this check cannot read ({exc}); its gitlinks are unknown",
                     f"inspect it before running git here, or rm {path} and rebuild it with git reset")
            return None

    def gitlink_git_dirs(self, gd: str, worktree: str, link: str) -> Iterator[str]:
        """The git dirs `git status` uses for the submodule at `link`: <link>/.git (a dir, a
        `gitdir:` file or a link to a dir) and <git dir>/modules/<name> for the names
        .gitmodules gives that path (and the path itself, git's default name)."""
        sub = self.inside(os.path.join(worktree, link))
        if sub is None:
            return
        dot_git = os.path.join(sub, GIT_DIR)
        st = _lstat(dot_git)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                yield dot_git
            elif stat.S_ISREG(st.st_mode):
                target = _gitfile_target(dot_git)
                if target is not None and (t := self.inside(target)) is not None:
                    yield t
            elif stat.S_ISLNK(st.st_mode):
                t = self.inside(os.path.join(sub, os.readlink(dot_git)))
                if t is not None:
                    yield t
        for name in {link, *_submodule_names(worktree, link)}:
            m = self.inside(os.path.join(gd, "modules", name))
            if m is not None and os.path.isdir(m):
                yield m

    def git_dir(self, gd: str, worktree: str, via_gitlink: str | None) -> None:
        hooks_dirs = [os.path.join(gd, "hooks")]
        for name in ("config", "config.worktree"):
            hooks_dirs += self.git_config(os.path.join(gd, name), worktree, via_gitlink, None, 0)
        for hooks in dict.fromkeys(hooks_dirs):
            self.hooks_dir(hooks)

    def git_config(self, path: str, worktree: str, via: str | None, included_by: str | None, depth: int) -> list[str]:
        """Report the code-running keys of one config (and what it includes); its hooks dirs."""
        st = _lstat(path)
        if st is None or depth > INCLUDE_DEPTH:
            return []
        fresh = self.new(st)
        if stat.S_ISLNK(st.st_mode):
            if fresh or via:
                self.add(wf.GIT_CONFIG, path, "git config is a new symlink (git reads its target)", f"rm {path}")
            return []
        data = _read_regular(path, GIT_CONFIG_MAX)
        if data is None:
            return []
        found = gitconfig.entries(_text(data))
        if fresh or via:
            why = "new since launch" if fresh else f"reachable through the new gitlink {via}"
            if included_by:
                why += f", included by {included_by}"
            for e in found:
                if gitconfig.runs_code(e):
                    self.add(wf.GIT_CONFIG, path, f"{e.name} = {e.value!r} runs a program ({why})",
                             f"delete the {e.name} line from {path}, or remove the repository it belongs to")
        hooks = []
        for value in gitconfig.hooks_paths(found):
            if not value.startswith("~"):
                p = self.inside(os.path.join(worktree, value))
                if p is not None:
                    hooks.append(p)
        for value in gitconfig.include_paths(found):
            if not value.startswith("~"):
                p = self.inside(os.path.join(os.path.dirname(path), value))
                if p is not None:
                    hooks += self.git_config(p, worktree, via, path, depth + 1)
        return hooks

    def hooks_dir(self, hooks: str) -> None:
        st = _lstat(hooks)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            if self.new(st):
                self.add(wf.GIT_HOOK, hooks, "hooks directory is a new symlink (git runs what it points at)", f"rm {hooks}")
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        try:
            with os.scandir(hooks) as it:
                entries = list(it)
        except OSError:
            return
        for e in entries:
            if e.name.endswith(".sample"):
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(est.st_mode) and self.new(est):
                self.add(wf.GIT_HOOK, e.path, f"new git hook {e.name} (git runs it on the matching command)", f"rm {e.path}")

    # --- the home paths the profile made writable --------------------------------------------

    def home(self, plan: RunPlan) -> None:
        for path, data in _home_settings(plan, self.new):
            if data is None:
                continue
            before = self.baseline.home_files.get(path)
            fmt = "toml" if path.endswith(".toml") else "json"
            for f in wf.home_findings(path, None if before is None else _text(before), _text(data), fmt):
                self.add(f.kind, f.path, f.detail, f.remedy)


_NO_STAT = os.stat_result((0,) * 10)


def _has_capability(path: str) -> bool:
    try:
        os.getxattr(path, _CAPABILITY_XATTR, follow_symlinks=False)
    except OSError as exc:
        # ENODATA: none set; ENOTSUP: the filesystem has no xattrs, so it cannot carry one.
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT)
    return True


def _gitfile_target(path: str) -> str | None:
    """The `gitdir: <path>` of a `.git` file, absolute (relative to the file's directory)."""
    data = _read_regular(path, GITFILE_MAX)
    if data is None:
        return None
    line = _text(data).splitlines()[0] if data else ""
    if not line.startswith("gitdir:"):
        return None
    target = line[len("gitdir:"):].strip()
    return os.path.join(os.path.dirname(path), target) if target else None


def _submodule_names(worktree: str, link: str) -> tuple[str, ...]:
    """The submodule names .gitmodules maps to the path `link`."""
    data = _read_regular(os.path.join(worktree, ".gitmodules"), GIT_CONFIG_MAX)
    if data is None:
        return ()
    return tuple(
        e.subsection for e in gitconfig.entries(_text(data))
        if e.section == "submodule" and e.subsection is not None and e.key == "path"
        and e.value is not None and os.path.normpath(e.value) == os.path.normpath(link)
    )


def _home_settings(
    plan: RunPlan, wanted: Callable[[os.stat_result], bool] = lambda st: True
) -> Iterator[tuple[str, bytes | None]]:
    """(path, bytes) of the agent settings files (.json/.toml, small) under the profile's writable
    home paths whose lstat `wanted` accepts; bounded in depth and count, links never followed."""
    count = 0
    stack = [(os.path.join(plan.home, rel), 0) for rel in plan.writable_home_paths]
    while stack and count < HOME_FILES_MAX:
        path, depth = stack.pop()
        st = _lstat(path)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode) and depth < HOME_DEPTH:
            try:
                names = os.listdir(path)
            except OSError:
                continue
            stack += [(os.path.join(path, n), depth + 1) for n in names]
        elif stat.S_ISREG(st.st_mode) and path.endswith(HOME_SUFFIXES) and st.st_size <= HOME_FILE_MAX:
            count += 1
            if wanted(st):
                yield path, _read_regular(path, HOME_FILE_MAX)


# --- after the run ---------------------------------------------------------------------------


def scan(plan: RunPlan, baseline: Baseline, limits: Limits | None = None) -> ScanResult:
    """Everything new since `baseline` that runs code later. Call after teardown: nothing of the
    agent's may still be writing."""
    s = _Scan(plan.cwd, baseline, limits or Limits())
    s.walk()
    s.git()
    s.home(plan)
    findings = sorted(s.findings.values(), key=lambda f: (f.path, f.kind, f.detail))
    return ScanResult(findings=tuple(findings), scanned=s.scanned)


def check_workspace(run: RunRecord, baseline: Baseline, status: int | None) -> int | None:
    """The check as a step of the launch sequence: scan, print the one findings block on stderr,
    record the check and the list in the proof, and return the run's exit status (DESIGN §13).
    A scan that fails is itself a finding: the workspace is then in an unknown state."""
    plan = run.plan
    try:
        result = scan(plan, baseline)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the user as a finding
        result = ScanResult((Finding(wf.INCOMPLETE, plan.cwd, f"the workspace check failed: {exc}",
                                     "review what the agent changed by hand before running git or tools here"),), 0)
    findings = result.findings
    run.workspace_findings = wf.json_list(findings)
    check = Check(wf.CHECK_NAME, not findings, wf.check_detail(findings, result.scanned))
    run.checks.append(check)  # not add_check: the block below is the one report on the terminal
    run.log(f"check {check.name} ok={str(check.ok).lower()} {check.detail}", "info")
    block = wf.render(findings, plan.on_workspace_findings)
    if block:
        run.log.block(block)
    if status is None:
        return None
    return wf.exit_status(status, findings, plan.on_workspace_findings)

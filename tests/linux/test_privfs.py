"""firma.privfs: the private-path rule, each refusal next to a control showing that the plain
operation (or the same call on a private path) would have gone ahead."""

from __future__ import annotations

import os
import stat

import pytest

from firma import privfs
from firma.privfs import PrivatePathError

NOBODY = 65534


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to chown to another uid (CI runs as root)")


@pytest.fixture
def home(tmp_path):
    d = tmp_path / "home"
    d.mkdir(mode=0o700)
    return d


def test_write_private_replaces_a_final_symlink_and_never_writes_through_it(home):
    target = home / "target"
    target.write_text("original")
    link = home / "proof.json"
    link.symlink_to(target)
    # control: a plain open follows the link and overwrites the target
    ctrl = home / "ctrl"
    ctrl.symlink_to(target)
    with open(ctrl, "w") as f:
        f.write("through the link")
    assert target.read_text() == "through the link"
    target.write_text("original")

    privfs.write_private(str(link), "proof")
    assert target.read_text() == "original"
    assert not link.is_symlink() and link.read_text() == "proof"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


def test_create_new_refuses_anything_already_there(home):
    target = home / "target"
    target.write_text("original")
    (home / "owner").symlink_to(target)
    with pytest.raises(FileExistsError):
        privfs.create_new(str(home / "owner"), "x")
    assert target.read_text() == "original"
    privfs.create_new(str(home / "fresh"), "x", 0o644)  # control: a new name is created, with its mode
    assert stat.S_IMODE((home / "fresh").stat().st_mode) == 0o644


def test_modes_do_not_depend_on_the_umask(home):
    old = os.umask(0)
    try:
        privfs.ensure_dir(str(home / "a" / "b"))
        privfs.write_private(str(home / "a" / "b" / "f"), b"x")
        fd = privfs.open_append(str(home / "a" / "log"))
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "a" / "b" / "f").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "a" / "log").stat().st_mode) == 0o600


def test_ensure_dir_refuses_a_symlink_a_loose_dir_and_a_file(home):
    real = home / "real"
    real.mkdir(mode=0o700)
    (home / "link").symlink_to(real)
    os.makedirs(home / "link", exist_ok=True)  # control: makedirs accepts the link
    with pytest.raises(PrivatePathError, match="is a symlink"):
        privfs.ensure_dir(str(home / "link"))
    loose = home / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(PrivatePathError, match="mode 0755; it must be 0700"):
        privfs.ensure_dir(str(loose))
    (home / "file").write_text("")
    with pytest.raises(PrivatePathError, match="not a directory"):
        privfs.ensure_dir(str(home / "file"))
    privfs.ensure_dir(str(real))  # control: a private directory of ours is accepted


def test_a_directory_of_another_user_is_refused(home):
    _need_root()
    theirs = home / "theirs"
    theirs.mkdir(mode=0o700)
    mine = home / "mine"
    mine.mkdir(mode=0o700)
    privfs.ensure_dir(str(mine))  # control
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match=f"owned by uid {NOBODY}"):
        privfs.ensure_dir(str(theirs))


def test_an_ancestor_of_another_user_or_writable_by_others_is_refused(home):
    _need_root()
    parent = home / "p"
    (parent / "cfg").mkdir(parents=True, mode=0o700)
    (parent / "cfg" / "f").write_text("policy")
    (parent / "cfg" / "f").chmod(0o600)
    parent.chmod(0o755)
    assert privfs.read_private(str(parent / "cfg" / "f"), 100)[0] == b"policy"  # control
    parent.chmod(0o777)
    with pytest.raises(PrivatePathError, match="writable by other users"):
        privfs.read_private(str(parent / "cfg" / "f"), 100)
    parent.chmod(0o755)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match=f"owned by uid {NOBODY}"):
        privfs.read_private(str(parent / "cfg" / "f"), 100)
    with pytest.raises(PrivatePathError, match=f"owned by uid {NOBODY}"):
        privfs.write_private(str(parent / "cfg" / "g"), "x")
    assert not (parent / "cfg" / "g").exists()


def test_a_sticky_world_writable_dir_is_an_ancestor_but_never_the_parent_of_a_trusted_file(home):
    _need_root()
    sticky = home / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "planted.toml").write_text("x")
    with pytest.raises(PrivatePathError, match="writable by other users"):
        privfs.read_private(str(sticky / "planted.toml"), 100)
    mine = sticky / "firma-0"
    privfs.ensure_dir(str(mine))  # a directory of ours directly in it: allowed (the state root)
    (mine / "f").write_text("ok")
    assert privfs.read_private(str(mine / "f"), 100)[0] == b"ok"  # as an ancestor: allowed


def test_read_private_refuses_a_link_and_a_foreign_or_writable_file(home):
    _need_root()
    f = home / "f"
    f.write_text("data")
    f.chmod(0o600)
    (home / "l").symlink_to(f)
    assert open(home / "l").read() == "data"  # control: a plain open follows the link
    with pytest.raises(PrivatePathError):
        privfs.read_private(str(home / "l"), 100)
    f.chmod(0o666)
    with pytest.raises(PrivatePathError, match="writable by group or others"):
        privfs.read_private(str(f), 100)
    assert privfs.read_private(str(f), 100, mode_checked_by_caller=True)[0] == b"data"
    f.chmod(0o600)
    os.chown(f, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match=f"owned by uid {NOBODY}"):
        privfs.read_private(str(f), 100)
    with pytest.raises(FileNotFoundError):
        privfs.read_private(str(home / "absent"), 100)


def test_open_append_refuses_a_link_and_another_users_file(home):
    _need_root()
    target = home / "target"
    target.write_text("")
    (home / "log").symlink_to(target)
    with pytest.raises(OSError):
        privfs.open_append(str(home / "log"))
    assert target.read_text() == ""
    theirs = home / "theirs.log"
    theirs.write_text("")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivatePathError, match=f"owned by uid {NOBODY}"):
        privfs.open_append(str(theirs))
    os.close(privfs.open_append(str(home / "mine.log")))  # control


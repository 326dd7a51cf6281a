"""The git index file format (versions 2, 3 and 4), read for one fact: which paths are gitlinks
(mode 160000, a submodule or nested repository that `git status` descends into). Pure.

Layout (git's Documentation/gitformat-index.txt): a 12-byte header "DIRC", version, entry count;
then per entry 40 bytes of stat data (ctime, mtime, dev, ino, mode, uid, gid, size), the object
id (20 bytes, 32 in a sha256 repository), 2 bytes of flags (bit 14: extended; low 12 bits: name
length), 2 more flag bytes when extended (version 3+), then the path: NUL-terminated and padded
with NULs to a multiple of 8 bytes of the entry (versions 2 and 3), or, in version 4, a varint
saying how many bytes to drop from the end of the previous path, then the NUL-terminated suffix
and no padding. Extensions and the trailing checksum follow the entries and are not needed."""

from __future__ import annotations

from .record import record

GITLINK_MODE = 0o160000
_MODE_TYPE = 0o170000
_SIGNATURE = b"DIRC"
_STAT_BYTES = 40
_MODE_OFFSET = 24
_FLAG_EXTENDED = 0x4000
_NAME_MASK = 0x0FFF


class IndexFormatError(ValueError):
    """The bytes are not an index this reader understands (one line, safe to print)."""


@record
class IndexGitlinks:
    version: int
    entries: int
    gitlinks: tuple[str, ...]  # paths as stored (bytes decoded with surrogateescape)


def _be(data: bytes, at: int, size: int) -> int:
    if at + size > len(data):
        raise IndexFormatError(f"truncated at byte {at}")
    return int.from_bytes(data[at : at + size], "big")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """git's offset varint (varint.c): 7 bits per byte, +1 per continuation."""
    if at >= len(data):
        raise IndexFormatError(f"truncated varint at byte {at}")
    c = data[at]
    at += 1
    value = c & 0x7F
    while c & 0x80:
        if at >= len(data) or value > (1 << 40):
            raise IndexFormatError(f"bad varint at byte {at}")
        c = data[at]
        at += 1
        value = ((value + 1) << 7) | (c & 0x7F)
    return value, at


def gitlinks(data: bytes, hash_size: int = 20) -> IndexGitlinks:
    """Parse `data` (a whole index file); IndexFormatError when it is not one."""
    if len(data) < 12 or data[:4] != _SIGNATURE:
        raise IndexFormatError("not a git index (no DIRC signature)")
    version = _be(data, 4, 4)
    if version not in (2, 3, 4):
        raise IndexFormatError(f"unsupported index version {version}")
    count = _be(data, 8, 4)
    # Every entry takes at least its fixed part: a count beyond that is a lie (and a cheap bound).
    fixed = _STAT_BYTES + hash_size + 2
    if count > (len(data) - 12) // fixed:
        raise IndexFormatError(f"entry count {count} exceeds the file size")
    at = 12
    previous = b""
    found: list[str] = []
    for _ in range(count):
        start = at
        mode = _be(data, at + _MODE_OFFSET, 4)
        flags = _be(data, at + _STAT_BYTES + hash_size, 2)
        at += fixed
        if flags & _FLAG_EXTENDED:
            if version < 3:
                raise IndexFormatError(f"extended flags in a version {version} index")
            at += 2
        if version == 4:
            drop, at = _varint(data, at)
            if drop > len(previous):
                raise IndexFormatError(f"path prefix length {drop} exceeds the previous path")
            end = data.find(b"\0", at)
            if end < 0:
                raise IndexFormatError(f"unterminated path at byte {at}")
            path = previous[: len(previous) - drop] + data[at:end]
            at = end + 1
        else:
            end = data.find(b"\0", at)
            if end < 0:
                raise IndexFormatError(f"unterminated path at byte {at}")
            path = data[at:end]
            # The name length in the flags is capped at 0xFFF; longer names rely on the NUL.
            if (flags & _NAME_MASK) != min(len(path), _NAME_MASK):
                raise IndexFormatError(f"path length mismatch at byte {start}")
            at = start + ((end - start + 8) & ~7)  # NUL padding to a multiple of 8
            if at > len(data):
                raise IndexFormatError(f"truncated entry at byte {start}")
        previous = path
        if mode & _MODE_TYPE == GITLINK_MODE:
            found.append(path.decode("utf-8", "surrogateescape"))
    return IndexGitlinks(version=version, entries=count, gitlinks=tuple(found))

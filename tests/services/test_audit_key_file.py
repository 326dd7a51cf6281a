"""The audit signing key: created once, atomically, and refused when it is not ours alone."""

from __future__ import annotations

import os
import threading

import pytest

from firma.core import auditfmt
from firma.errors import AuditError
from firma.services.audit_writer import load_or_create_key


def _pub(key) -> bytes:
    return auditfmt.key_pem(key)


def test_concurrent_creators_all_get_the_same_complete_key(tmp_path):
    path = str(tmp_path / "audit.key")
    barrier = threading.Barrier(16)
    keys, errors = [], []

    def create():
        barrier.wait()
        try:
            keys.append(load_or_create_key(path))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    on_disk = open(path, "rb").read()
    assert {_pub(k) for k in keys} == {on_disk}
    assert os.stat(path).st_mode & 0o777 == 0o600
    # no temp files left behind
    assert sorted(os.listdir(tmp_path)) == ["audit.key"]


def test_existing_key_is_reused(tmp_path):
    path = str(tmp_path / "audit.key")
    first = load_or_create_key(path)
    assert _pub(load_or_create_key(path)) == _pub(first)


def test_symlinked_key_is_refused(tmp_path):
    real = tmp_path / "elsewhere.key"
    load_or_create_key(str(real))
    link = tmp_path / "audit.key"
    link.symlink_to(real)
    with pytest.raises(AuditError, match="cannot load audit key"):
        load_or_create_key(str(link))


def test_group_readable_key_is_refused(tmp_path):
    path = tmp_path / "audit.key"
    load_or_create_key(str(path))
    path.chmod(0o640)
    with pytest.raises(AuditError, match="chmod 600"):
        load_or_create_key(str(path))


def test_garbage_key_is_refused(tmp_path):
    path = tmp_path / "audit.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(AuditError, match="remove it to generate a new one"):
        load_or_create_key(str(path))


def test_load_soon_parses_the_key_on_the_writer_thread_before_any_event(tmp_path):
    """`load_soon` (the services process calls it once serving) loads the key with no event and
    no waiter; a key that does not parse sets `failed` the same way. Control: without it, the
    key stays unparsed."""
    from firma.services.audit_writer import AuditWriter

    key = tmp_path / "audit.key"
    load_or_create_key(str(key))
    idle = AuditWriter(str(tmp_path / "a.jsonl"), key_path=str(key))
    eager = AuditWriter(str(tmp_path / "b.jsonl"), key_path=str(key))
    try:
        assert eager.load_soon()
        eager._key_ready.result(timeout=10)  # the thread loaded it
        assert not idle._key_ready.done()  # control: nothing asked for it
    finally:
        idle.close()
        eager.close()
    assert not eager.load_soon()  # closed: nothing more is loaded

    wrong = tmp_path / "wrong.key"
    pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n"
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    broken = AuditWriter(str(tmp_path / "c.jsonl"), key_path=str(wrong))
    try:
        broken.load_soon()
        with pytest.raises(AuditError):
            broken._key_ready.result(timeout=10)
        assert broken.failed
    finally:
        broken.close()

"""The audit hash chain on real files (DESIGN §9 "Chain"): `firma audit verify` names the first
broken position and its kind for deleted, reordered, inserted, truncated and modified lines, tells
a crash's incomplete write from tampering, survives concurrent writers in separate processes, and
follows the chain across rotated files (a deleted middle file is detected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from firma.core import auditfmt
from firma.core.auditcaps import AuditCaps
from firma.services.audit_chainfile import ChainedLog
from firma.services.audit_files import load_or_create_key

FIRMA = [sys.executable, "-m", "firma"]


def verify(path, *extra, env=None):
    return subprocess.run(FIRMA + ["audit", "verify", *([str(path)] if path else []), *extra], capture_output=True,
                          text=True, timeout=120, env=env)


def line(key, n, sandbox="sbx_1"):
    ev = auditfmt.make_event(sandbox_id=sandbox, action="http.request", resource=f"http://h.test/{n}", decision=2,
                             deny_reason="host_not_allowed")
    return auditfmt.signed_line(ev, key).encode()


@pytest.fixture
def log(tmp_path):
    """A chained log of 6 lines written in three batches (so records and lines both matter)."""
    path = tmp_path / "audit.jsonl"
    key = load_or_create_key(str(tmp_path / "audit.key"))
    chained = ChainedLog(str(path), AuditCaps())
    for batch in ([0, 1], [2, 3, 4], [5]):
        chained.append([line(key, n) for n in batch], key)
    chained.close()
    return path, key


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


def test_untouched_log_verifies_with_counts(log):
    path, _key = log
    r = verify(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "OK: 6 lines verified in 1 file(s), chain intact\n"


def test_deleted_line_is_named(log):
    path, _key = log
    ls = lines_of(path)
    path.write_bytes(b"".join(ls[:2] + ls[3:]))
    r = verify(path)
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL: audit.jsonl line 3: deleted: line(s) 3 as chained are missing"), r.stdout


def test_reordered_pair_is_named(log):
    path, _key = log
    ls = lines_of(path)
    ls[3], ls[4] = ls[4], ls[3]
    path.write_bytes(b"".join(ls))
    r = verify(path)
    assert r.returncode == 1 and r.stdout.startswith("FAIL: audit.jsonl line 4: reordered: the line here was chained as line 5"), r.stdout


def test_inserted_line_forged_with_the_key_is_named(log):
    path, key = log
    ls = lines_of(path)
    forged = line(key, 99) + b"\n"
    assert auditfmt.verify_line(forged.decode(), key.public_key()) == (True, "")  # a valid signature
    path.write_bytes(b"".join(ls[:2] + [forged] + ls[2:]))
    r = verify(path)
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL: audit.jsonl line 3: inserted: 1 line(s) not in the chain") and "validly signed" in r.stdout, r.stdout
    # control: the same line without the chain passes a signatures-only check
    assert verify(path, "--no-chain").returncode == 0


def test_truncated_file_is_named(log):
    path, _key = log
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(lines_of(path)[-1]) - 40])  # the last line gone, the one before cut
    r = verify(path)
    assert r.returncode == 1 and r.stdout.startswith("FAIL: audit.jsonl line 5: truncated: the file ends inside line 5"), r.stdout
    path.write_bytes(b"".join(lines_of(path)[:4]))  # cut on a line boundary
    r = verify(path)
    assert r.returncode == 1 and r.stdout.startswith("FAIL: audit.jsonl line 5: truncated: the file ends after line 4; "
                                                     "its checkpoints record 6 lines"), r.stdout


def test_modified_line_is_named(log):
    path, key = log
    ls = lines_of(path)
    ev = json.loads(ls[1])
    ev["decision"] = 1  # deny turned into allow, signature untouched
    ls[1] = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(ls))
    r = verify(path)
    assert r.returncode == 1 and r.stdout.startswith("FAIL: audit.jsonl line 2: modified:") and "bad signature" in r.stdout
    # re-signed with the key: the signature verifies, the chain still does not
    ev = json.loads(ls[1])
    del ev["signature"]
    ls[1] = auditfmt.signed_line(ev, key).encode() + b"\n"
    path.write_bytes(b"".join(ls))
    r = verify(path)
    assert r.returncode == 1 and "line 2: modified" in r.stdout and "re-signed" in r.stdout, r.stdout


def test_crash_mid_write_is_reported_as_incomplete_then_sealed(log):
    path, key = log
    with open(path, "ab") as f:
        f.write(line(key, 6)[:50])  # a writer died mid-line, before its checkpoint
    r = verify(path)
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL: audit.jsonl line 7: incomplete write: incomplete final write after position 6"), r.stdout
    for word in ("deleted", "inserted", "modified", "reordered", "truncated"):
        assert f": {word}:" not in r.stdout + r.stderr
    # The next writer seals the fragment (ends it, records it as a crash) and carries on.
    chained = ChainedLog(str(path), AuditCaps())
    chained.append([line(key, 7)], key)
    chained.close()
    r = verify(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: 8 lines verified") and "note: audit.jsonl lines 7: written by a writer that stopped " \
        "before their checkpoint (a crash), sealed by the next writer; the last one partial" in r.stderr


def test_verify_defaults_to_the_state_root(log, tmp_path):
    r = verify(None, env={**os.environ, "FIRMA_STATE_DIR": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.startswith("OK: 6 lines verified"), r.stdout + r.stderr


WRITER = textwrap.dedent("""
    import sys
    from firma.services.audit_writer import AuditWriter
    path, key, n, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    w = AuditWriter(path, key_path=key)
    for i in range(n):
        # one sandbox per event: the per-sandbox rate cap is not what this test is about
        w.submit(sandbox_id=f"{tag}-{i}", action="http.request", resource=f"http://h.test/{tag}/{i}", decision=2)
        if i % 50 == 0:
            import time; time.sleep(0.001)  # interleave batches with the other writers
    w.close()
    print(w.written)
""")


def test_concurrent_writer_processes_keep_one_chain(tmp_path):
    path, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    load_or_create_key(str(key))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(key), "400", f"p{k}"], stdout=subprocess.PIPE,
                              text=True) for k in range(4)]
    written = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs) and written == [400] * 4
    r = verify(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: 1600 lines verified in 1 file(s)")
    records = (tmp_path / "audit.jsonl.chain").read_text().splitlines()
    assert len(records) > 4  # the writers' batches interleave: more than one record per writer


def rotate_log(tmp_path, n=120):
    path = tmp_path / "audit.jsonl"
    key = load_or_create_key(str(tmp_path / "audit.key"))
    chained = ChainedLog(str(path), AuditCaps(rotate_bytes=8 * 1024, keep_rotated=3))
    for i in range(n):
        chained.append([line(key, i)], key)
    chained.close()
    return path


def test_rotation_keeps_the_chain_across_files(tmp_path):
    path = rotate_log(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert {"audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3", "audit.jsonl.3.chain"} <= set(names)
    assert "audit.jsonl.4" not in names  # the oldest fell off
    assert all(os.path.getsize(tmp_path / n) <= 8 * 1024 for n in names if n.startswith("audit.jsonl") and n[-1].isdigit())
    r = verify(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in 4 file(s), chain intact" in r.stdout


def test_deleting_a_rotated_middle_file_is_detected(tmp_path):
    path = rotate_log(tmp_path)
    os.unlink(tmp_path / "audit.jsonl.2")
    os.unlink(tmp_path / "audit.jsonl.2.chain")
    r = verify(path)
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL: audit.jsonl.1: deleted: generation") and "files missing (a rotated file deleted)" in r.stdout, r.stdout


def test_deleting_the_oldest_rotated_file_is_detected(tmp_path):
    path = rotate_log(tmp_path)
    os.unlink(tmp_path / "audit.jsonl.3")
    os.unlink(tmp_path / "audit.jsonl.3.chain")
    r = verify(path)
    assert r.returncode == 1 and ": deleted: generation(s)" in r.stdout and "keeps 3 rotated files" in r.stdout, r.stdout


def test_a_log_without_checkpoints_is_reported_unchained(tmp_path):
    key = load_or_create_key(str(tmp_path / "audit.key"))
    path = tmp_path / "ref.jsonl"
    path.write_bytes(line(key, 1) + b"\n")
    r = verify(path)
    assert r.returncode == 1 and r.stdout.startswith("FAIL: ref.jsonl: unchained: no checkpoint records") and "--no-chain" in r.stdout
    assert verify(path, "--no-chain").stdout == "OK: 1 lines verified (signatures only)\n"


def test_events_a_few_milliseconds_apart_share_a_checkpoint_and_close_flushes_them(tmp_path):
    """The writer gathers events for a moment before it signs and appends them (one checkpoint
    per batch, not per event: the per-event work slowed every small request). Control: with
    the window at zero the same spacing gives about one checkpoint per event."""
    import time as _time

    from firma.services import audit_writer

    def run(window: float, sub: str) -> tuple[int, int]:
        d = tmp_path / sub
        d.mkdir()
        path = d / "audit.jsonl"
        w = audit_writer.AuditWriter(str(path), key_path=str(d / "audit.key"), batch_window=window)
        for i in range(30):
            w.submit(sandbox_id=f"s{i}", action="network.connect", resource=f"h.test:{i}", decision=1)
            _time.sleep(0.002)
        w.close()
        r = verify(path)
        assert r.returncode == 0 and r.stdout.startswith("OK: 30 lines verified"), r.stdout + r.stderr
        return len(lines_of(path)), len((d / "audit.jsonl.chain").read_text().splitlines())

    lines, records = run(audit_writer.BATCH_WINDOW_SECS, "batched")
    assert lines == 30 and records <= 10, records
    lines, records = run(0.0, "unbatched")
    assert lines == 30 and records >= 20, records

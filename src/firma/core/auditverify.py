"""Verdicts over a snapshot of the audit log, its rotated files and their checkpoints (DESIGN §9
"Verify"), pure: the caller reads the files and feeds lines in.

Each file is checked against its own checkpoint records: every line's short digest in order,
the chain at every record boundary, every event's signature. The first mismatch is named by file
and line and classified (deleted, inserted, reordered, modified, truncated, or an incomplete
final write, which is a crash rather than tampering). Across files, generations must follow each
other and each file's chain must start where its predecessor's ended."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from . import auditfmt
from .auditchain import GAP_CRASH, GAP_UNCHAINED, GENESIS, Checkpoint, chain_step, line_digest, parse_checkpoint
from .record import record

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

DELETED, INSERTED, REORDERED, MODIFIED = "deleted", "inserted", "reordered", "modified"
TRUNCATED, INCOMPLETE, CHECKPOINT, UNCHAINED = "truncated", "incomplete write", "checkpoint", "unchained"


@record
class Break:
    file: str
    line: int  # 1-based; 0 when a whole file is concerned
    kind: str
    detail: str

    def describe(self) -> str:
        where = f"{self.file} line {self.line}" if self.line else self.file
        return f"{where}: {self.kind}: {self.detail}"


@record
class FileResult:
    name: str
    lines: int
    gen: int  # 0: no checkpoint record
    first_prev: bytes
    last_chain: bytes
    keep: int
    breaks: tuple[Break, ...]
    bad_signatures: tuple[tuple[int, str], ...]
    notes: tuple[str, ...]


@record
class Verdict:
    files: int
    lines: int
    breaks: tuple[Break, ...]  # in file order; the first is the first broken position
    bad_signatures: tuple[tuple[str, int, str], ...]  # (file, line, why)
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.bad_signatures


def _checkpoints(name: str, chain_bytes: bytes, public_key: ec.EllipticCurvePublicKey) -> tuple[list[Checkpoint], Break | None, list[str]]:
    """The file's records that verify and continue each other, up to the first that does not."""
    chain_name = name + ".chain"
    raw = chain_bytes.split(b"\n")
    notes = []
    if raw[-1]:  # a record cut short: its writer died mid-write (the next writer removes it)
        notes.append(f"{chain_name}: a partial final checkpoint record (a crash while writing it) was ignored")
    out: list[Checkpoint] = []
    for n, line in enumerate(raw[:-1], 1):
        cp, why = parse_checkpoint(line, public_key)
        if cp is None:
            return out, Break(chain_name, n, CHECKPOINT, f"record {why}"), notes
        if out:
            last = out[-1]
            if cp.seq != last.seq + 1:
                kind = "missing (deleted)" if cp.seq > last.seq + 1 else "out of order"
                return out, Break(chain_name, n, CHECKPOINT, f"record seq {cp.seq} follows seq {last.seq}: records {kind}"), notes
            if cp.gen != last.gen or cp.start != last.start + last.count or cp.prev != last.chain:
                return out, Break(chain_name, n, CHECKPOINT, "record does not continue the previous record's chain"), notes
        elif cp.seq != 0 or cp.start != 0:
            return out, Break(chain_name, n, CHECKPOINT, f"the first record has seq {cp.seq}: earlier records deleted"), notes
        out.append(cp)
    return out, None, notes


def _sig(line: bytes, public_key: ec.EllipticCurvePublicKey) -> tuple[bool, str]:
    return auditfmt.verify_line(line.decode("utf-8", "replace"), public_key)


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}..{b}"


def _classify(name: str, i: int, line: bytes, complete: bool, obs: list[str], exp: list[str],
              public_key: ec.EllipticCurvePublicKey) -> Break:
    """The first mismatch at 0-based line i: `obs` are the digests from there on in the file,
    `exp` those the checkpoints record from there on."""
    pos = i + 1
    if len(obs) == 1 and not complete:
        return Break(name, pos, TRUNCATED, f"the file ends inside line {pos}; its checkpoints record {i + len(exp)} lines")
    obs_set, exp_set = set(obs), set(exp)
    d, e = obs[0], exp[0]
    if e not in obs_set and d in exp_set:
        n = next((k for k, x in enumerate(exp) if x in obs_set), len(exp))
        return Break(name, pos, DELETED, f"line(s) {_span(pos, i + n)} as chained are missing; "
                                         f"the line here was chained as line {i + 1 + exp.index(d)}")
    if d not in exp_set and e in obs_set:
        n = next((k for k, x in enumerate(obs) if x in exp_set), len(obs))
        ok, why = _sig(line, public_key)
        signed = "validly signed, so forged with the key" if ok else f"its signature: {why}"
        return Break(name, pos, INSERTED, f"{n} line(s) not in the chain before the line chained as {pos} ({signed})")
    if d in exp_set and e in obs_set:
        return Break(name, pos, REORDERED, f"the line here was chained as line {i + 1 + exp.index(d)}; "
                                           f"line {pos} as chained is now line {i + 1 + obs.index(e)}")
    ok, why = _sig(line, public_key)
    signed = "its signature still verifies, so it was re-signed with the key" if ok else f"its signature: {why}"
    return Break(name, pos, MODIFIED, f"the line differs from the one chained here ({signed})")


def verify_file(name: str, chain_bytes: bytes | None, log_lines: Iterable[tuple[bytes, bool]],
                public_key: ec.EllipticCurvePublicKey) -> FileResult:
    """One log file against its checkpoint file's bytes (None: no checkpoint file). `log_lines`
    yields (line without its newline, whether a newline ended it)."""
    cps, brk, notes = _checkpoints(name, chain_bytes or b"", public_key)
    expected: list[str] = []
    ends: dict[int, Checkpoint] = {}
    gap_brk: Break | None = None
    skip_sig: set[int] = set()  # a sealed partial line: a crash fragment, not an event
    for cp in cps:
        expected.extend(cp.lines)
        ends[cp.start + cp.count] = cp
        a, b = cp.start + 1, cp.start + cp.count
        if cp.gap == GAP_CRASH:
            notes.append(f"{name} lines {_span(a, b)}: written by a writer that stopped before their checkpoint "
                         f"(a crash), sealed by the next writer{'; the last one partial' if cp.partial else ''}")
        elif cp.gap == GAP_UNCHAINED and cp.gen == 1 and cp.start == 0:
            notes.append(f"{name} lines {_span(a, b)} predate the chain (no checkpoint file then): signatures checked only")
        elif cp.gap == GAP_UNCHAINED and gap_brk is None:
            gap_brk = Break(name, a, UNCHAINED, f"lines {_span(a, b)} were found without their checkpoint file "
                                            "(deleted?) and sealed by a later writer")
        if cp.gap and cp.partial:
            skip_sig.add(b)
    h = cps[0].prev if cps else GENESIS
    bad: list[tuple[int, str]] = []
    i = 0
    it: Iterator[tuple[bytes, bool]] = iter(log_lines)
    line_brk: Break | None = None
    for line, complete in it:
        if not cps:  # nothing to chain against: signatures only, and the file is reported unchained
            line_brk = Break(name, 0, UNCHAINED, f"no checkpoint records ({name}.chain missing or empty): the chain "
                                                 "cannot be checked; a log from before chaining or from another "
                                                 "implementation can be checked with --no-chain")
            i += 1
            ok, why = _sig(line, public_key)
            if not ok:
                bad.append((i, why))
            continue
        if i >= len(expected):
            ends_complete = [complete] + [c for _x, c in it]
            extra, last_complete = len(ends_complete), ends_complete[-1]
            part = "; the last one partial" if not last_complete else ""
            line_brk = Break(name, i + 1, INCOMPLETE,
                             f"incomplete final write after position {i}: {extra} line(s) not covered by any checkpoint "
                             f"(a writer stopped between appending and checkpointing{part}; the next writer seals them)")
            break
        d = line_digest(line)
        if d != expected[i]:
            obs = [d] + [line_digest(x) for x, _c in it]
            line_brk = _classify(name, i, line, complete, obs, expected[i:], public_key)
            break
        h = chain_step(h, line)
        end_cp = ends.get(i + 1)
        if end_cp is not None and h != end_cp.chain:
            line_brk = Break(name, i + 1, MODIFIED, "the chain hash differs from the checkpoint's (digest collision?)")
            break
        i += 1
        if i not in skip_sig:
            ok, why = _sig(line, public_key)
            if not ok:
                bad.append((i, why))
    else:
        if i < len(expected):
            line_brk = Break(name, i + 1, TRUNCATED, f"the file ends after line {i}; its checkpoints record {len(expected)} lines")
    found = [b for b in (line_brk, gap_brk, brk) if b is not None]
    if brk is not None:  # lines past the last good record are a consequence of the bad record
        found = [b for b in found if b.kind != INCOMPLETE and not (b.kind == UNCHAINED and not b.line)]
    found.sort(key=lambda b: (b.file != name, b.line))  # the log's own positions first, then its checkpoint file
    return FileResult(name=name, lines=i, gen=cps[0].gen if cps else 0, first_prev=cps[0].prev if cps else GENESIS,
                      last_chain=cps[-1].chain if cps else GENESIS, keep=cps[-1].keep if cps else 0, breaks=tuple(found),
                      bad_signatures=tuple(bad), notes=tuple(notes))


def series_verdict(results: list[FileResult], missing_logs: tuple[str, ...] = ()) -> Verdict:
    """The rotated files and the current one, oldest first: each file's result plus the links
    between them. `missing_logs`: checkpoint files whose log file is gone."""
    breaks: list[Break] = [Break(m, 0, DELETED, "the log file is missing while its checkpoint file exists") for m in missing_logs]
    chained = [r for r in results if r.gen]
    if chained:
        newest = chained[-1]
        oldest = chained[0]
        expect_oldest = max(1, newest.gen - newest.keep)
        if oldest.gen > expect_oldest:
            breaks.append(Break(oldest.name, 0, DELETED, f"generation(s) {_span(expect_oldest, oldest.gen - 1)} are missing: "
                                                         f"the writer keeps {newest.keep} rotated files"))
        elif oldest.gen == 1 and oldest.first_prev != GENESIS:
            breaks.append(Break(oldest.name, 1, MODIFIED, "the first generation does not start the chain from zero"))
    prev: FileResult | None = None
    for r in results:
        breaks.extend(r.breaks)
        if not r.gen:
            continue
        if prev is not None:
            if r.gen != prev.gen + 1:
                what = "missing (a rotated file deleted)" if r.gen > prev.gen + 1 else "out of order"
                breaks.append(Break(r.name, 0, DELETED if r.gen > prev.gen else REORDERED,
                                    f"generation {r.gen} follows {prev.name}'s generation {prev.gen}: files {what}"))
            elif r.first_prev != prev.last_chain:
                breaks.append(Break(r.name, 1, TRUNCATED, f"its chain does not continue from the end of {prev.name}"))
        prev = r
    bad = tuple((r.name, n, why) for r in results for n, why in r.bad_signatures)
    return Verdict(files=len(results), lines=sum(r.lines for r in results), breaks=tuple(breaks), bad_signatures=bad,
                   notes=tuple(n for r in results for n in r.notes))

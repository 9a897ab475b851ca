"""The contribution ledger as pure functions of a snapshot, and its file: who trained which verified
steps, what a stranger can and cannot get credited for, and what a fetched ledger must agree with."""

from __future__ import annotations

import hashlib

import pytest

from swarm import ledger
from swarm.claims import Snapshot
from swarm.ledger import Entry, LedgerError, LedgerFile, credit, from_snapshot, parse
from swarm.records import RunRecord, Verdict, VerdictsRecord, fingerprint

RUN = RunRecord("ab" * 32, 2, ["tiny", "tiny"], ["fm", "fm"], 100, expert_steps=100, router_steps=10, started=1.0)
OWNER, ALICE, BOB, EVE = (f"[owner:{name}]".encode() for name in ("owner", "alice", "bob", "eve"))
FP = {k: fingerprint(k) for k in (OWNER, ALICE, BOB, EVE)}
BATCH = 64  # the tiny preset's batch: what a verified step's FLOPs are counted at


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ok(job_step: str, signer: bytes, step: int, t: float, samples: int) -> Verdict:
    return Verdict(sha(job_step), step, FP[signer], True, t, 0.5, "", "bytes", samples)


def snapshot(verdicts: dict[str, dict[bytes, list[Verdict]]]) -> Snapshot:
    return Snapshot(
        run=RUN,
        verdicts={
            job: {k: VerdictsRecord(RUN.manifest_sha256, v) for k, v in by.items()} for job, by in verdicts.items()
        },
        owner=FP[OWNER],
        me="f" * 32,
    )


def takeover() -> Snapshot:
    """Alice trains expert_0 to step 20 (batch 8), dies; Bob resumes from 20 and reaches 40; Bob
    also trains expert_1 to 10. The run's owner verified all of it."""
    return snapshot(
        {
            "expert_0": {
                OWNER: [
                    ok("e0-10", ALICE, 10, 10.0, 80),
                    ok("e0-20", ALICE, 20, 20.0, 160),
                    ok("e0-30", BOB, 30, 30.0, 240),
                    ok("e0-40", BOB, 40, 40.0, 320),
                ]
            },
            "expert_1": {OWNER: [ok("e1-10", BOB, 10, 15.0, 80)]},
        }
    )


def by_key(entries: list[Entry]) -> dict[str, ledger.Contribution]:
    return {c.key: c for c in credit(entries, RUN)}


def test_each_key_is_credited_the_steps_its_checkpoints_added_across_a_takeover():
    got = by_key(from_snapshot(takeover()))
    assert got[FP[ALICE]].jobs == {"expert_0": {"steps": 20, "samples": 160}}
    assert got[FP[BOB]].jobs == {"expert_0": {"steps": 20, "samples": 160}, "expert_1": {"steps": 10, "samples": 80}}
    assert (got[FP[ALICE]].first, got[FP[ALICE]].last) == (10.0, 20.0)
    total = sum(c.flops for c in got.values())
    summary = ledger.summary(from_snapshot(takeover()), RUN)
    assert summary["total_steps"] == 50 and summary["total_flops"] == pytest.approx(total)
    share = {c["key"]: c["share"] for c in summary["contributors"]}
    assert share[FP[ALICE]] == pytest.approx(160 / 400) and share[FP[BOB]] == pytest.approx(240 / 400)


def test_a_refused_checkpoint_earns_nothing_and_a_strangers_refused_record_takes_nothing_away():
    snap = takeover()
    eve = snapshot({"expert_1": {OWNER: [Verdict(sha("e1-20"), 20, FP[EVE], False, 50.0, 0.0, "loss too high")]}})
    # Eve republishes Bob's accepted hash at another step: the owner refuses her record alone.
    stolen = Verdict(sha("e1-10"), 10, FP[EVE], False, 51.0, 0.0, "no claim held", "record")
    snap.verdicts["expert_1"][OWNER].entries.extend([*eve.verdicts["expert_1"][OWNER].entries, stolen])
    got = by_key(from_snapshot(snap))
    assert FP[EVE] not in got
    assert got[FP[BOB]].jobs["expert_1"]["steps"] == 10


def test_only_the_runs_trusted_verifiers_count():
    snap = takeover()
    # Eve verifies her own make-believe checkpoint: she is not a verifier this run trusts.
    snap.verdicts["expert_1"][EVE] = VerdictsRecord(RUN.manifest_sha256, [ok("e1-90", EVE, 90, 60.0, 720)])
    assert FP[EVE] not in by_key(from_snapshot(snap))


def test_the_share_counts_verified_steps_at_the_presets_batch_whatever_samples_a_trainer_claims():
    snap = snapshot(
        {"expert_0": {OWNER: [ok("e0-10", EVE, 10, 1.0, 10**15), ok("e0-20", ALICE, 20, 2.0, 10**15 + 80)]}}
    )
    got = by_key(from_snapshot(snap))
    assert got[FP[EVE]].samples == 10 * ledger.MAX_SAMPLES_PER_STEP and got[FP[ALICE]].samples == 80
    assert got[FP[EVE]].flops == got[FP[ALICE]].flops == 10 * BATCH * ledger.flops_per_sample(RUN, "expert_0")


def test_the_earliest_acceptance_of_a_step_wins_it():
    snap = snapshot({"expert_0": {OWNER: [ok("e0-10", ALICE, 10, 1.0, 80), ok("e0-10b", BOB, 10, 2.0, 80)]}})
    got = by_key(from_snapshot(snap))
    assert got[FP[ALICE]].steps == 10 and FP[BOB] not in got


def test_parse_trusts_nothing_in_a_peers_ledger():
    good = b"".join(ledger.line(e) for e in from_snapshot(takeover()))
    assert parse(good, RUN) == from_snapshot(takeover())
    bad = {
        b"not json\n": "not a ledger entry",
        good[:-1]: "cut off",
        good + good.splitlines(keepends=True)[0]: "a second time",
        good.replace(b'"expert_1"', b'"expert_7"'): "does not have",
        good.replace(b'"step":10', b'"step":-1', 1): "not a ledger entry",
        good.replace(b'"samples":80', b'"samples":80,"extra":1', 1): "not a ledger entry",
        b'{"__class__": "os.system"}\n': "not a ledger entry",
    }
    for data, why in bad.items():
        with pytest.raises(LedgerError, match=why):
            parse(data, RUN)
    with pytest.raises(LedgerError, match="at most"):
        parse(b" " * (ledger.MAX_LEDGER_BYTES + 1), RUN)


def test_check_holds_a_ledger_to_the_verdicts_seen():
    snap, entries = takeover(), from_snapshot(takeover())
    assert ledger.check(entries, snap, until=100.0) == []
    missing = [e for e in entries if e.step != 40]
    assert any("is not in it" in p for p in ledger.check(missing, snap, until=100.0))
    assert ledger.check(missing, snap, until=35.0) == []  # newer than the ledger: not missing from it
    moved = [e if e.step != 40 else Entry(e.t, e.job, e.step, e.sha256, FP[EVE], e.samples) for e in entries]
    assert any("credited to" in p for p in ledger.check(moved, snap, until=100.0))


def test_ledger_file_only_grows_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    book = LedgerFile(path, RUN)
    entries = from_snapshot(takeover())
    assert len(book.add(entries[:3])) == 3 and book.add(entries[:3]) == []
    assert len(book.add(entries)) == 2
    assert book.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "ab") as f:
        f.write(b'{"t": 99')  # a crash in the middle of a write
    again = LedgerFile(path, RUN)
    assert again.entries == sorted(entries) and again.digest == book.digest
    copy = again.frozen_copy(tmp_path / "served")
    assert copy.name == f"{again.digest}.jsonl" and copy.read_bytes() == path.read_bytes()
    again.add([ok_entry := Entry(70.0, "router", 5, sha("r5"), FP[ALICE], 640, 0.1, FP[OWNER])])
    assert ok_entry in LedgerFile(path, RUN).entries
    assert [p.name for p in (tmp_path / "served").iterdir()] == [copy.name]  # not yet re-frozen
    newer = again.frozen_copy(tmp_path / "served")
    assert [p.name for p in (tmp_path / "served").iterdir()] == [newer.name]
    path.write_bytes(b"garbage\n")
    with pytest.raises(LedgerError, match="not a ledger entry"):
        LedgerFile(path, RUN)

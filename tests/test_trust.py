"""What a node trusts, as pure functions of a snapshot: which run (name and owner key), which
claims (admitted, plausible, progressing) and which checkpoints (verified) count."""

from pathlib import Path

import pytest

from roles.preparer import AdmissionError, read_admission
from swarm import claims
from swarm.claims import Snapshot
from swarm.records import (
    CheckpointRecord,
    ClaimRecord,
    RunRecord,
    RunRef,
    Verdict,
    VerdictsRecord,
    blob_key,
    decode,
    encode,
    fingerprint,
    in_run,
    run_key,
    runs_key,
)
from swarm.verify import cheap_refusal, loss_refusal

SHA = "a" * 64
NOW = 10_000.0


def key(i: int) -> bytes:
    return b"[owner:key%03d]" % i


OWNER, ME, HONEST, STRANGER = key(0), key(1), key(2), key(3)
RUN = RunRecord(SHA, 2, ["tiny"] * 2, ["fm", "fm"], 100, name="r", started=1_000.0, grace_s=600.0)


def snap(run=RUN, claims_=None, ckpts=None, verdicts=(), **kw) -> Snapshot:
    return Snapshot(
        run,
        claims=claims_ or {},
        ckpts=ckpts or {},
        verdicts={} if verdicts == () else verdicts,  # None: verification not read
        now=NOW,
        owner=fingerprint(OWNER),
        me=fingerprint(ME),
        **kw,
    )


def ck(step: int, sha: str = "c" * 64, preset: str = "tiny", objective: str = "fm") -> CheckpointRecord:
    return CheckpointRecord(SHA, step, sha, 1, objective, preset, 0.5, ["p"])


def judged(verifier: bytes, *entries: Verdict) -> dict[bytes, VerdictsRecord]:
    return {verifier: VerdictsRecord(SHA, list(entries))}


def test_run_refs_namespace_every_key_but_the_global_ones():
    ref = RunRef.parse(f"demo-1@{fingerprint(OWNER)}")
    assert str(ref) == f"demo-1@{fingerprint(OWNER)}"
    assert in_run(run_key(), ref) == f"diffswarm_demo-1_{fingerprint(OWNER)}_run"
    assert in_run(runs_key(), ref) == runs_key() and in_run(blob_key(SHA), ref) == blob_key(SHA)
    other = RunRef("demo-1", fingerprint(STRANGER))
    assert in_run(run_key(), other) != in_run(run_key(), ref)  # same name, other owner: other keys
    for bad in ("demo", "demo@xyz", "a b@" + "0" * 32, "x" * 33 + "@" + "0" * 32):
        with pytest.raises(ValueError, match="NAME@FINGERPRINT"):
            RunRef.parse(bad)


def test_claims_from_before_the_run_or_from_the_future_never_win():
    c = {"expert_0": {
        STRANGER: ClaimRecord(SHA, "squatter", 0.0),  # t0 = 0: would win forever under min(t0)
        key(4): ClaimRecord(SHA, "future", NOW + 3600),  # from an hour ahead
        HONEST: ClaimRecord(SHA, "honest", NOW - 10),
    }}  # fmt: skip
    assert claims.winner(snap(claims_=c), "expert_0") == HONEST


def test_a_claim_without_verified_progress_expires_after_the_grace_period():
    t0 = NOW - 700  # older than the grace (600 s)
    c = {"expert_0": {STRANGER: ClaimRecord(SHA, "squatter", t0), HONEST: ClaimRecord(SHA, "honest", t0 + 1)}}
    assert claims.winner(snap(claims_=c), "expert_0") is None  # neither showed progress: both expired
    # The honest one's checkpoint was verified 100 s ago: it holds the job, the squatter does not.
    v = Verdict("d" * 64, 50, fingerprint(HONEST), True, NOW - 100, 0.4)
    s = snap(claims_=c, verdicts={"expert_0": judged(OWNER, v)})
    assert claims.winner(s, "expert_0") == HONEST
    # A verdict from a stranger is no evidence; the squatter's own peer record is not either.
    s = snap(
        claims_=c, verdicts={"expert_0": judged(STRANGER, Verdict("e" * 64, 9, fingerprint(STRANGER), True, NOW, 0.1))}
    )
    assert claims.winner(s, "expert_0") is None
    # A fresh claim has the grace period ahead of it.
    assert claims.winner(snap(claims_={"expert_0": {HONEST: ClaimRecord(SHA, "h", NOW - 5)}}), "expert_0") == HONEST


def test_allowlist_admits_listed_keys_and_the_owner_only():
    run = RunRecord(SHA, 2, ["tiny"] * 2, ["fm", "fm"], 100, started=1_000.0, admission="allowlist",
                    allowed=[fingerprint(HONEST)])  # fmt: skip
    c = {"expert_0": {STRANGER: ClaimRecord(SHA, "s", NOW - 20), HONEST: ClaimRecord(SHA, "h", NOW - 10)}}
    k = {"expert_1": {STRANGER: ck(10, "1" * 64), OWNER: ck(5, "2" * 64)}}
    s = snap(run, claims_=c, ckpts=k, verdicts=None)
    assert claims.winner(s, "expert_0") == HONEST
    assert claims.latest_checkpoint(s, "expert_1").sha256 == "2" * 64  # the stranger's is ignored
    # Switched to open: the stranger's earlier claim wins again.
    opened = snap(RunRecord(**{**run.__dict__, "admission": "open", "allowed": []}), claims_=c)
    assert claims.winner(opened, "expert_0") == STRANGER
    # A key banned here counts for nothing, whatever the run says.
    assert claims.winner(snap(claims_=c, banned=frozenset({fingerprint(STRANGER)})), "expert_0") == HONEST


def test_only_verified_checkpoints_count_and_one_trusted_refusal_refuses():
    good, bogus = ck(100, "1" * 64), ck(10**9, "2" * 64)
    k = {"expert_0": {HONEST: good, STRANGER: bogus}}
    s = snap(ckpts=k)
    assert claims.latest_checkpoint(s, "expert_0") is None  # nothing verified yet
    assert [r.sha256 for _, r in claims.pending(s, "expert_0")] == ["2" * 64, "1" * 64]
    ok = Verdict(good.sha256, 100, fingerprint(HONEST), True, NOW, 0.4)
    s = snap(ckpts=k, verdicts={"expert_0": judged(OWNER, ok)})
    assert claims.latest_checkpoint(s, "expert_0") == good
    assert not claims.done(
        Snapshot(RUN, ckpts=k, verdicts={"expert_0": judged(OWNER, ok)}, owner=fingerprint(OWNER)), "expert_0"
    )
    # A stranger "accepting" its own bogus record changes nothing; the owner's refusal is final.
    fake = Verdict(bogus.sha256, bogus.step, fingerprint(STRANGER), True, NOW, 0.0)
    s = snap(ckpts=k, verdicts={"expert_0": {**judged(OWNER, ok), **judged(STRANGER, fake)}})
    assert claims.latest_checkpoint(s, "expert_0") == good
    no = Verdict(good.sha256, 100, fingerprint(HONEST), False, NOW, 9.0, "held-out loss 9.0 is worse than 1.0")
    s = snap(ckpts=k, verdicts={"expert_0": {**judged(OWNER, ok), **judged(ME, no)}})
    assert claims.latest_checkpoint(s, "expert_0") is None
    assert claims.refused(s, "expert_0")[0].reason.startswith("held-out loss")
    # A replica record that claims another step for a verified hash is judged anew, not believed.
    liar = {"expert_0": {HONEST: good, STRANGER: ck(5000, good.sha256)}}
    s = snap(ckpts=liar, verdicts={"expert_0": judged(OWNER, ok)})
    assert claims.latest_checkpoint(s, "expert_0").step == 100
    assert [r.step for _, r in claims.pending(s, "expert_0")] == [5000]


def test_a_mirror_holds_what_its_verifier_accepted_when_the_owner_has_moved_on():
    """The owner checkpoints faster than verifiers judge: each verdict lands on a record already
    replaced. The verifier's own accepted copy is then what mirrors hold (and publish)."""
    old, judged_here, newer = ck(100, "1" * 64), ck(220, "2" * 64), ck(240, "3" * 64)
    ok_old = Verdict(old.sha256, 100, fingerprint(HONEST), True, NOW, 0.5)
    ok_here = Verdict(judged_here.sha256, 220, fingerprint(HONEST), True, NOW, 0.4)
    # The owner's record now shows step 240 (unjudged); only a replica of step 100 is verified.
    k = {"router": {HONEST: newer, key(7): old}}
    s = snap(ckpts=k, verdicts={"router": {**judged(OWNER, ok_old), **judged(ME, ok_here)}})
    assert claims.latest_checkpoint(s, "router") == old
    assert claims.to_mirror(s, "router", judged_here) == judged_here
    assert claims.to_mirror(s, "router", None) == old
    # Not when it is behind the latest on record, from another run, or refused by a trusted verifier.
    assert claims.to_mirror(s, "router", ck(50, "4" * 64)) == old
    other = CheckpointRecord("f" * 64, 300, "5" * 64, 1, "fm", "tiny", 0.5, ["p"])
    assert claims.to_mirror(s, "router", other) == old
    no = Verdict(judged_here.sha256, 220, fingerprint(HONEST), False, NOW, 0.9, "held-out loss")
    s = snap(ckpts=k, verdicts={"router": {**judged(OWNER, ok_old, no), **judged(ME, ok_here)}})
    assert claims.to_mirror(s, "router", judged_here) == old


def test_loss_refusal_bans_garbage_and_only_refuses_a_regression():
    untrained, bar, m = 1.06, 0.53, 0.25
    assert loss_refusal(0.50, 0.55, untrained, bar, m) == (None, False)
    # A small router's raw weights swing (0.95 at one checkpoint, 0.55 at the next): the
    # sampling weights are fine, so it is accepted; the raw ones are only held to untrained.
    assert loss_refusal(0.56, 0.95, untrained, bar, m) == (None, False)
    reason, ban = loss_refusal(0.75, 0.60, untrained, bar, m)  # worse than the last accepted
    assert "worse than 0.5300" in reason and not ban
    for sampling, train in ((5.0, 0.5), (0.5, 5.0), (float("nan"), 0.5), (0.5, float("inf"))):
        reason, ban = loss_refusal(sampling, train, untrained, bar, m)
        assert "held-out loss" in reason and "untrained" in reason and ban


def test_cheap_checks_refuse_impossible_steps_and_foreign_configs():
    holds = {"expert_0": {HONEST: ClaimRecord(SHA, "h", NOW - 500)}}  # held for 500 s (within the grace)
    s = snap(claims_=holds)
    reason, ban = cheap_refusal(s, "expert_0", HONEST, ck(10**9))
    assert "steps/s" in reason and ban
    assert cheap_refusal(s, "expert_0", HONEST, ck(2000)) is None  # 4 steps/s over 500 s: plausible
    assert "config" in cheap_refusal(s, "expert_0", HONEST, ck(10, preset="XL/2"))[0]
    assert "config" in cheap_refusal(s, "expert_0", HONEST, ck(10, objective="ddpm"))[0]
    assert cheap_refusal(s, "expert_0", OWNER, ck(10**6)) is None  # the owner may publish what it trained before
    # The step is measured from the last accepted checkpoint and its time.
    prev = Verdict("1" * 64, 500, fingerprint(HONEST), True, NOW - 1, 0.4)
    s = snap(claims_=holds, verdicts={"expert_0": judged(OWNER, prev)})
    assert cheap_refusal(s, "expert_0", HONEST, ck(600)) is None
    assert "steps/s" in cheap_refusal(s, "expert_0", HONEST, ck(500 + 10**6))[0]


def test_only_the_claim_holder_adds_steps_within_the_time_it_held_the_claim():
    """Checkpoint authority: a key that holds no claim adds nothing (refused, not banned: an honest
    mirror may republish); the holder adds steps at a plausible rate within its tenure, measured
    from when it took the claim, and a holder that has released is judged by what a verifier saw."""
    s = snap()
    reason, ban = cheap_refusal(s, "expert_0", STRANGER, ck(10))
    assert "does not hold the expert_0 claim" in reason and not ban
    # A claim taken 10 s ago: 10 s (+ the clock slack) at 500 steps/s, not the run's 9000 s.
    late = snap(claims_={"expert_0": {HONEST: ClaimRecord(SHA, "h", NOW - 10)}})
    assert cheap_refusal(late, "expert_0", HONEST, ck(500 * 70 - 1)) is None
    assert "steps/s" in cheap_refusal(late, "expert_0", HONEST, ck(500 * 71))[0]
    # Its holder has released: the live claims no longer name it, a verifier's tenure does.
    tenure = claims.Tenure()
    tenure.observe(late)
    gone = snap()
    assert claims.held_span(gone, "expert_0", HONEST, tenure) == (NOW - 10, NOW + claims.CLAIM_TTL_S)
    assert cheap_refusal(gone, "expert_0", HONEST, ck(100), tenure) is None
    assert cheap_refusal(gone, "expert_0", STRANGER, ck(100), tenure)[0].startswith("its signer does not hold")
    assert not tenure.watched(NOW) and tenure.watched(NOW + claims.CLAIM_TTL_S)


def test_a_refusal_of_a_record_lands_on_its_signer_only():
    """Republishing an honest hash under a bogus step: the refusal of that record holds for the
    republisher's record, not for the honest record of the same hash at its own step; a refusal
    of the bytes holds for every record of them."""
    good = ck(100, "9" * 64)
    k = {"expert_0": {HONEST: good, STRANGER: ck(10**9, good.sha256)}}
    bogus = Verdict(good.sha256, 10**9, fingerprint(STRANGER), False, NOW, 0.0, "steps/s", about="record")
    s = snap(ckpts=k, verdicts={"expert_0": judged(OWNER, bogus)})
    assert claims.verdict(s, "expert_0", k["expert_0"][STRANGER], STRANGER) is False
    assert claims.verdict(s, "expert_0", good, HONEST) is None  # still pending, not refused
    # The same step republished by the stranger and refused as its record: the honest one is not.
    same = Verdict(good.sha256, 100, fingerprint(STRANGER), False, NOW, 0.0, "no claim", about="record")
    s = snap(ckpts=k, verdicts={"expert_0": judged(OWNER, same)})
    assert claims.verdict(s, "expert_0", good, HONEST) is None
    assert claims.verdict(s, "expert_0", good, STRANGER) is False
    garbage = Verdict(good.sha256, 100, fingerprint(HONEST), False, NOW, 9.0, "held-out loss")
    s = snap(ckpts=k, verdicts={"expert_0": judged(OWNER, garbage)})
    assert claims.verdict(s, "expert_0", good, HONEST) is False and claims.verdict(s, "expert_0", good) is False


def test_the_quality_bar_is_the_best_accepted_checkpoint_so_regressions_do_not_compound():
    """A chain of 1.2x regressions, each within the 25 % margin of the one before: held to the best
    accepted loss, the second is refused."""
    untrained, m = 1.0, 0.25
    best = Verdict("1" * 64, 100, fingerprint(HONEST), True, NOW - 60, 0.27)
    first = Verdict("2" * 64, 110, fingerprint(STRANGER), True, NOW - 30, 0.27 * 1.2)
    s = snap(verdicts={"expert_0": judged(OWNER, best, first)})
    assert claims.last_accepted(s, "expert_0") == first
    assert claims.best_accepted(s, "expert_0") == best
    bar = claims.best_accepted(s, "expert_0").loss
    reason, ban = loss_refusal(0.27 * 1.2 * 1.2, 0.3, untrained, bar, m)
    assert "worse than 0.2700" in reason and not ban


def test_an_owner_that_cannot_see_its_own_claim_keeps_its_job():
    """A flood may cut a read short: the owner's own claim missing from it is no reason to stop;
    only a valid claim that beats it is."""
    mine = ClaimRecord(SHA, "h", NOW - 100)
    flood = {"expert_0": {key(100 + i): ClaimRecord(SHA, "x", NOW - 50) for i in range(20)}}
    s = snap(claims_=flood)
    assert not claims.still_wins(s, "expert_0", HONEST)
    assert claims.still_wins(s, "expert_0", HONEST, mine)
    earlier = {"expert_0": {**flood["expert_0"], STRANGER: ClaimRecord(SHA, "x", NOW - 200)}}
    assert not claims.still_wins(snap(claims_=earlier), "expert_0", HONEST, mine)


def test_one_key_is_one_identity():
    """A subkey is exactly [owner:KEY]: anything around the marker, or a key written in another
    form, would let one key sign as many identities."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.records import OwnerSubkeyValidator, canonical_owner, claimed_owner

    me = RSASignatureValidator(RSAPrivateKey()).local_public_key
    assert canonical_owner(me) == me
    for variant in (me + b"x", b"x" + me, me[:-1] + b" comment]", me + me):
        assert canonical_owner(variant) is None
    assert claimed_owner(me + b"suffix") == me
    check = OwnerSubkeyValidator()

    def record(subkey: bytes) -> DHTRecord:
        return DHTRecord(b"k", DHTProtocol.serializer.dumps(subkey), b"v", 0.0)

    assert check.validate(record(me)) and not check.validate(record(me + b"1"))
    assert check.validate(DHTRecord(b"k", DHTProtocol.IS_REGULAR_VALUE, b"v", 0.0))


def test_records_round_trip_and_malformed_ones_are_dropped():
    v = VerdictsRecord(SHA, [Verdict("1" * 64, 5, "0" * 32, False, 1.0, 0.0, "why")])
    assert decode(VerdictsRecord, encode(v)) == v
    assert decode(RunRecord, encode(RUN)) == RUN
    assert decode(VerdictsRecord, {**encode(v), "entries": [{"sha256": "x"}]}) is None
    assert decode(RunRecord, {**encode(RUN), "allowed": ["not-a-fingerprint"]}) is None


def test_allowlist_files(tmp_path: Path):
    f = tmp_path / "allow.txt"
    f.write_text(f"# trainers\n{fingerprint(HONEST)}  # alice\n\n{fingerprint(ME)}\n")
    assert read_admission(f) == ("allowlist", sorted([fingerprint(HONEST), fingerprint(ME)]))
    f.write_text("open\n")
    assert read_admission(f) == ("open", [])
    f.write_text("alice\n")
    with pytest.raises(AdmissionError, match="not a key fingerprint"):
        read_admission(f)
    with pytest.raises(AdmissionError, match="cannot read"):
        read_admission(tmp_path / "missing.txt")


def test_the_distill_job_is_free_only_once_every_expert_and_the_router_are_done():
    run = RunRecord(SHA, 2, ["tiny"] * 2, ["fm", "ddpm"], 100, 10, 4, name="r", started=1_000.0, distill_steps=20)
    assert run.jobs() == ["expert_0", "expert_1", "router", "distill"] and run.target("distill") == 20
    assert cheap_refusal(snap(run), "distill", OWNER, ck(5, preset="tiny", objective="ddpm")) is not None
    assert cheap_refusal(snap(run), "distill", OWNER, ck(5)) is None  # the student predicts velocity

    def at(job_steps: dict[str, int]) -> Snapshot:
        recs = {j: {OWNER: ck(s, sha=f"{i:064x}")} for i, (j, s) in enumerate(job_steps.items())}
        ok = {
            j: judged(OWNER, Verdict(r[OWNER].sha256, r[OWNER].step, fingerprint(OWNER), True, NOW))
            for j, r in recs.items()
        }
        return snap(run, ckpts=recs, verdicts=ok)

    nearly = at({"expert_0": 10, "expert_1": 10, "router": 3})
    assert not claims.teacher_done(nearly)
    assert claims.choose_job(nearly, ME) == "router" and claims.choose_job(nearly, ME, "distill") is None
    done = at({"expert_0": 10, "expert_1": 10, "router": 4})
    assert claims.teacher_done(done) and claims.choose_job(done, ME) == "distill"
    assert not claims.run_complete(done)
    assert claims.run_complete(at({"expert_0": 10, "expert_1": 10, "router": 4, "distill": 20}))


def test_a_refusal_quoting_a_strangers_metadata_is_cut_to_what_a_verdict_holds():
    from swarm.verify import Verifier

    class Node:
        def publish_verdict(self, *a) -> None:
            self.published = a

        bans = type("B", (), {"ban": lambda *a: None})()

    verifier = Verifier.__new__(Verifier)
    verifier.node, verifier._judged, verifier.accepted, verifier._best = Node(), {}, {}, {}
    v = verifier._judge(snap(), "expert_0", STRANGER, ck(5), "its metadata says kind=" + "x" * 500)
    assert len(v.reason) == 160
    encode(VerdictsRecord(SHA, [v]))  # would raise if the schema refused it

"""The claim rule and the record schema as pure functions, without a network."""

import itertools
import random

from data.job_id import JobId
from swarm.claims import Snapshot, choose_job, done, latest_checkpoint, owners, run_complete, still_wins, winner
from swarm.records import CheckpointRecord, ClaimRecord, PeerRecord, RunRecord, decode, encode

RUN = RunRecord("a" * 64, 3, ["tiny"] * 3, ["fm", "fm", "ddpm"], 1234)
OTHER_RUN = "b" * 64


def key(i: int) -> bytes:
    return b"[owner:key%03d]" % i


def test_winner_is_min_t0_then_owner_key_and_ignores_other_runs():
    snap = Snapshot(
        RUN,
        claims={
            "expert_0": {
                key(2): ClaimRecord(RUN.manifest_sha256, "p2", 10.0),
                key(1): ClaimRecord(RUN.manifest_sha256, "p1", 10.0),
                key(0): ClaimRecord(OTHER_RUN, "p0", 1.0),
                key(3): ClaimRecord(RUN.manifest_sha256, "p3", 11.0),
            }
        },
    )
    assert winner(snap, "expert_0") == key(1)
    assert still_wins(snap, "expert_0", key(1)) and not still_wins(snap, "expert_0", key(2))
    assert winner(snap, "expert_1") is None
    snap.claims["expert_0"][key(1)] = ClaimRecord(RUN.manifest_sha256, "p1", 10.0, active=False)  # withdrawn
    assert winner(snap, "expert_0") == key(2)


def test_choose_job_keeps_own_job_then_prefers_least_trained_expert_then_router():
    snap = Snapshot(
        RUN,
        claims={"expert_1": {key(1): ClaimRecord(RUN.manifest_sha256, "p1", 1.0)}},
        ckpts={
            "expert_0": {key(9): CheckpointRecord(RUN.manifest_sha256, 500, "c" * 64, 1, "fm", "tiny", 0.1, ["p9"])}
        },
    )
    assert choose_job(snap, key(1)) == "expert_1"  # keeps what it owns
    assert choose_job(snap, key(5)) == "expert_2"  # expert_0 already has 500 steps of progress
    assert choose_job(snap, key(5), wanted="expert_1") is None  # taken: wait
    assert choose_job(snap, key(5), wanted="expert_0") == "expert_0"
    assert latest_checkpoint(snap, "expert_0").step == 500
    everything = {str(JobId.expert(k)): {key(k): ClaimRecord(RUN.manifest_sha256, "p", 1.0)} for k in range(3)}
    assert choose_job(Snapshot(RUN, claims=everything), key(7)) == "router"
    everything["router"] = {key(8): ClaimRecord(RUN.manifest_sha256, "p", 1.0)}
    assert choose_job(Snapshot(RUN, claims=everything), key(7)) is None  # nothing free: wait


def test_jobs_at_the_run_target_are_done_and_trainers_move_on():
    run = RunRecord("a" * 64, 2, ["tiny"] * 2, ["fm", "fm"], 1234, expert_steps=300, router_steps=100)

    def ck(step: int) -> dict:
        return {key(9): CheckpointRecord(run.manifest_sha256, step, "c" * 64, 1, "fm", "tiny", 0.1, ["p9"])}

    snap = Snapshot(
        run,
        claims={"expert_0": {key(1): ClaimRecord(run.manifest_sha256, "p1", 1.0)}},
        ckpts={"expert_0": ck(300), "expert_1": ck(299)},
    )
    assert done(snap, "expert_0") and not done(snap, "expert_1")
    assert choose_job(snap, key(1)) == "expert_1"  # its own job is done: it moves on
    assert choose_job(snap, key(2), wanted="expert_0") is None  # a done job is not taken again
    snap.claims["expert_1"] = {key(2): ClaimRecord(run.manifest_sha256, "p2", 2.0)}
    assert choose_job(snap, key(1)) == "router"  # every unfinished expert has an owner
    snap.ckpts["expert_1"], snap.ckpts["router"] = ck(300), ck(100)
    assert run_complete(snap) and choose_job(snap, key(3)) is None
    assert not run_complete(Snapshot(RUN, ckpts={j: ck(10**6) for j in RUN.jobs()}))  # no target: never done


def test_a_checkpoint_nobody_alive_provides_is_neither_latest_nor_done():
    run = RunRecord("a" * 64, 2, ["tiny"] * 2, ["fm", "fm"], 1234, expert_steps=300)
    lost = CheckpointRecord(run.manifest_sha256, 300, "d" * 64, 1, "fm", "tiny", 0.1, ["dead"])
    replica = CheckpointRecord(run.manifest_sha256, 200, "e" * 64, 1, "fm", "tiny", 0.2, ["mirror"])
    ckpts = {"expert_0": {key(1): lost, key(2): replica}}
    both = Snapshot(run, ckpts=ckpts, providers={lost.sha256: {"dead"}, replica.sha256: {"mirror"}})
    assert latest_checkpoint(both, "expert_0") == lost and done(both, "expert_0")
    # The owner died and nobody else held step 300: its record is a promise nobody can keep.
    gone = Snapshot(run, ckpts=ckpts, providers={lost.sha256: set(), replica.sha256: {"mirror"}})
    assert latest_checkpoint(gone, "expert_0") == replica, "the newest step a live peer holds is the latest"
    assert not done(gone, "expert_0"), "a job whose target checkpoint is lost is not done"
    assert choose_job(gone, key(5), wanted="expert_0") == "expert_0", "so a trainer takes it up again"
    nothing = Snapshot(run, ckpts=ckpts, providers={})
    assert latest_checkpoint(nothing, "expert_0") is None and not run_complete(nothing)


def test_an_owners_record_and_a_mirrors_copy_of_it_resolve_the_same_way_in_any_order():
    run = RunRecord("a" * 64, 2, ["tiny"] * 2, ["fm", "fm"], 1234, expert_steps=300)
    own = CheckpointRecord(run.manifest_sha256, 200, "d" * 64, 1, "fm", "tiny", 0.1, ["owner"])
    copy = CheckpointRecord(run.manifest_sha256, 200, "d" * 64, 1, "fm", "tiny", 0.1, ["mirror"])
    providers = {own.sha256: {"owner", "mirror"}}
    a, b = (
        latest_checkpoint(Snapshot(run, ckpts={"expert_0": dict(order)}, providers=providers), "expert_0")
        for order in ([(key(1), own), (key(2), copy)], [(key(2), copy), (key(1), own)])
    )
    assert a == b, "the same snapshot listed in another order gives another record"


def test_simultaneous_claims_settle_to_one_owner_per_job():
    """Rounds of the protocol on a shared snapshot: everyone claims what it chose, re-reads,
    losers withdraw. Every job ends with exactly one owner and nobody believes otherwise."""
    rng = random.Random(0)
    for trial in range(20):
        nodes = [key(i) for i in rng.sample(range(100), 6)]
        claims: dict[str, dict[bytes, ClaimRecord]] = {}
        t = 0.0
        for _ in range(6):
            snap = Snapshot(RUN, claims={j: dict(c) for j, c in claims.items()})
            for n in nodes:
                job = choose_job(snap, n)
                if job and n not in claims.get(job, {}):
                    claims.setdefault(job, {})[n] = ClaimRecord(RUN.manifest_sha256, "p", t + rng.random())
            settled = Snapshot(RUN, claims={j: dict(c) for j, c in claims.items()})
            for job, cs in claims.items():  # losers withdraw after the settle time
                for n in list(cs):
                    if not still_wins(settled, job, n):
                        del cs[n]
            t += 1.0
        final = Snapshot(RUN, claims=claims)
        own = owners(final)
        assert all(own[j] is not None for j in RUN.jobs()), trial
        for job in RUN.jobs():
            believers = [n for n in nodes if still_wins(final, job, n)]
            assert len(believers) == 1
        assert len(set(own.values())) == len(RUN.jobs())  # 4 jobs, 4 distinct owners, 2 idle
        assert not any(list(itertools.chain(*(cs for cs in claims.values()))).count(n) > 1 for n in nodes)


def test_records_round_trip_and_reject_malformed_values():
    rec = CheckpointRecord(RUN.manifest_sha256, 10, "d" * 64, 99, "fm", "tiny", 0.5, ["peer"])
    assert decode(CheckpointRecord, encode(rec)) == rec
    bad = encode(rec) | {"step": -1}
    assert decode(CheckpointRecord, bad) is None
    assert decode(CheckpointRecord, encode(rec) | {"sha256": "not-a-hash"}) is None
    assert decode(ClaimRecord, "a string") is None
    assert decode(RunRecord, encode(RUN)) == RUN
    peer = PeerRecord("peer", "trainer", "training", "expert_1", 40, 0.25, 171.0)
    assert decode(PeerRecord, encode(peer)) == peer
    assert decode(PeerRecord, encode(peer) | {"step": 4.0}) is None  # strict types: no silent conversion

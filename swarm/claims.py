"""The claim rule (docs/design.md §6) as pure functions of a DHT snapshot.

There is no compare-and-swap in a DHT, so ownership is decided by everyone the same way from
what they read: among the live claims of a job for this run, the winner is the one with the
smallest ``(t0, owner key)``. A node claims a free job, waits a settle time, re-reads, and
withdraws if it does not win; an owner re-checks at each renewal and stops once it no longer
wins. Expired claims vanish from the DHT by themselves, which frees the job for idle trainers.

Peers are strangers, so what a decision rests on is checked here too, the same way by everyone:
- admission: in an ``allowlist`` run, claims and checkpoints of keys the owner did not list are
  ignored (the run owner is always admitted);
- plausible claims: a claim's t0 must lie within the run's lifetime (not before it started, not
  after now plus a clock slack), so nobody wins a job forever with t0 = 0;
- progress: a claim whose owner has shown no verified checkpoint for the run's grace period
  (counted from its t0) has expired for everyone, so a squatter that never trains loses the job;
- verified checkpoints: a checkpoint counts (for resume, mirrors, servers, "done") only once a
  verifier this node trusts (the run owner, this node itself, and in an allowlist run the listed
  trainers) has accepted it, and never once one of them refused it. A refusal of the bytes holds
  for every record of that hash and step; a refusal of a record (a step nobody could have reached,
  a signer that held no claim) holds for its signer's record only, so nobody can get an honest
  checkpoint refused by republishing its hash;
- authority: a checkpoint adds steps only when its signer held the job's claim while it trained
  them (:func:`held_span`, from the live claims and what a verifier saw of them, :class:`Tenure`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from data.job_id import JobId
from swarm.records import (
    CLAIM_TTL_S,
    CLOCK_SLACK_S,
    CheckpointRecord,
    ClaimRecord,
    RunRecord,
    Verdict,
    VerdictsRecord,
    fingerprint,
)


@dataclass
class Snapshot:
    """What a node read from the DHT at one moment (expired records already dropped)."""

    run: RunRecord
    claims: dict[str, dict[bytes, ClaimRecord]] = field(default_factory=dict)  # job → owner → claim
    ckpts: dict[str, dict[bytes, CheckpointRecord]] = field(default_factory=dict)  # job → owner → record
    # checkpoint sha256 → peers whose provider record is live (None: not read, every one counts)
    providers: dict[str, set[str]] | None = None
    # job → verifier key → its verdicts (None: not read, every checkpoint counts as verified)
    verdicts: dict[str, dict[bytes, VerdictsRecord]] | None = None
    now: float = 0.0  # DHT time of the reading (0: claim times and progress are not checked)
    owner: str = ""  # fingerprint of the run's owner ("": none known)
    me: str = ""  # fingerprint of the node that read it: its own verdicts count for it
    banned: frozenset[str] = frozenset()  # fingerprints this node has banned locally

    def admitted(self, key: bytes) -> bool:
        """Records of this key count: it is not banned here, and the run admits it."""
        fp = fingerprint(key)
        if fp in self.banned:
            return False
        return self.run.admission == "open" or fp == self.owner or fp in self.run.allowed

    def live_claims(self, job: str) -> dict[bytes, ClaimRecord]:
        """Claims of ``job`` that count: this run's, active, admitted, plausible and progressing."""
        return {
            o: c
            for o, c in self.claims.get(job, {}).items()
            if c.active
            and c.run == self.run.manifest_sha256
            and self.admitted(o)
            and plausible(self, c)
            and not stale(self, job, o, c)
        }


def plausible(snap: Snapshot, claim: ClaimRecord) -> bool:
    """A claim's t0 lies within the run's lifetime: not before it started, not in the future."""
    if claim.t0 < snap.run.started - CLOCK_SLACK_S:
        return False
    return snap.now == 0.0 or claim.t0 <= snap.now + CLOCK_SLACK_S


def trusted(snap: Snapshot) -> set[str]:
    """Verifiers whose verdicts count for this node."""
    out = {snap.owner, snap.me} - {""}
    if snap.run.admission == "allowlist":
        out |= set(snap.run.allowed)
    return out - snap.banned


def verdicts(snap: Snapshot, job: str) -> list[Verdict]:
    """The trusted verifiers' verdicts on ``job``'s checkpoints in this run."""
    if not snap.verdicts:
        return []
    ok = trusted(snap)
    return [
        v
        for key, rec in snap.verdicts.get(job, {}).items()
        if rec.run == snap.run.manifest_sha256 and fingerprint(key) in ok
        for v in rec.entries
    ]


def verdict(snap: Snapshot, job: str, rec: CheckpointRecord, signer: bytes | None = None) -> bool | None:
    """True: accepted; False: refused; None: not verified yet. A verdict is on (hash, step): a
    record that claims another step for a known hash is judged anew. One trusted refusal is
    enough to refuse: a refusal of the bytes refuses every record of them, a refusal of a record
    only the records its signer signed (``signer``: who signed ``rec``; ``None``: only refusals of
    the bytes count)."""
    if snap.verdicts is None:
        return True
    mine = [v for v in verdicts(snap, job) if v.sha256 == rec.sha256 and v.step == rec.step]
    fp = fingerprint(signer) if signer is not None else None
    if any(not v.ok and (v.about == "bytes" or v.owner == fp) for v in mine):
        return False
    return True if any(v.ok for v in mine) else None


def refused(snap: Snapshot, job: str) -> list[Verdict]:
    """The trusted refusals of ``job``'s checkpoints, newest first (the dashboard shows why)."""
    return sorted((v for v in verdicts(snap, job) if not v.ok), key=lambda v: -v.t)


def last_accepted(snap: Snapshot, job: str) -> Verdict | None:
    """The most advanced checkpoint of ``job`` a trusted verifier accepted (what a new
    checkpoint's step rate is measured against)."""
    good = [v for v in verdicts(snap, job) if v.ok]
    return max(good, key=lambda v: (v.step, v.t)) if good else None


def best_accepted(snap: Snapshot, job: str) -> Verdict | None:
    """The accepted checkpoint of ``job`` with the lowest held-out loss: what a new checkpoint's
    loss is held to. Against the last accepted one a chain of small regressions, each within the
    margin, would compound; against the best, the second one is refused."""
    good = [v for v in verdicts(snap, job) if v.ok and v.loss > 0]
    return min(good, key=lambda v: (v.loss, -v.step)) if good else None


@dataclass
class Tenure:
    """Who a verifier saw win each job's claim, and until when: a claim lives only while it is
    renewed, so once its holder has released it (or lost it) the live claims no longer say who
    trained the steps of a checkpoint still waiting for a verdict. Kept in memory by each verifier;
    pure bookkeeping of the snapshots it read."""

    since: float = 0.0  # DHT time of the first snapshot observed (0: none yet)
    held: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # job → fp → (t0, last seen)

    def observe(self, snap: Snapshot, keep: int = 64) -> None:
        if snap.now == 0.0:
            return
        self.since = self.since or snap.now
        for job in snap.claims:
            owner = winner(snap, job)
            if owner is None:
                continue
            t0 = snap.live_claims(job)[owner].t0
            seen = self.held.setdefault(job, {})
            seen[fingerprint(owner)] = (t0, snap.now)  # a new claim by the same key starts a new tenure
            if len(seen) > keep:  # many short-lived holders: forget the longest gone
                for fp, _ in sorted(seen.items(), key=lambda item: item[1][1])[: len(seen) - keep]:
                    del seen[fp]

    def watched(self, now: float) -> bool:
        """Long enough to know: a claim that was live when watching began was seen by now."""
        return self.since > 0.0 and now - self.since >= CLAIM_TTL_S


def held_span(snap: Snapshot, job: str, key: bytes, tenure: Tenure | None = None) -> tuple[float, float] | None:
    """(from, until): when ``key`` held the claim of ``job``, as far as the live claims and
    ``tenure`` say; ``None`` if it held none. A holder seen last at T may have trained until its
    claim expired, one claim lifetime later."""
    if winner(snap, job) == key:
        return snap.live_claims(job)[key].t0, snap.now
    seen = tenure.held.get(job, {}).get(fingerprint(key)) if tenure is not None else None
    if seen is not None:
        return seen[0], seen[1] + CLAIM_TTL_S
    return None


def stale(snap: Snapshot, job: str, key: bytes, claim: ClaimRecord) -> bool:
    """The claim's owner has shown no verified checkpoint of ``job`` within the run's grace
    period, counted from its t0. A peer record's step is the owner's own word, so only checkpoints
    a trusted verifier accepted count as progress."""
    if snap.now == 0.0 or snap.verdicts is None:
        return False
    fp = fingerprint(key)
    progress = max([claim.t0, *(v.t for v in verdicts(snap, job) if v.ok and v.owner == fp)])
    return snap.now - progress > snap.run.grace_s


def winner(snapshot: Snapshot, job: str) -> bytes | None:
    """The owner of ``job``: min (t0, owner key) over its live claims; ``None`` if unclaimed."""
    live = snapshot.live_claims(job)
    if not live:
        return None
    return min(live, key=lambda owner: (live[owner].t0, owner))


def owners(snapshot: Snapshot) -> dict[str, bytes | None]:
    return {job: winner(snapshot, job) for job in snapshot.run.jobs()}


def available(snapshot: Snapshot, rec: CheckpointRecord) -> bool:
    """Some live peer provides this checkpoint: a record whose every holder is gone is a promise
    nobody can keep (provider records expire within ``PROVIDER_TTL_S`` of their peer's death)."""
    return snapshot.providers is None or bool(snapshot.providers.get(rec.sha256))


def candidates(snapshot: Snapshot, job: str) -> list[tuple[bytes, CheckpointRecord]]:
    """Checkpoint records of ``job`` in this run from admitted keys that a live peer provides."""
    return [
        (o, r)
        for o, r in snapshot.ckpts.get(job, {}).items()
        if r.run == snapshot.run.manifest_sha256 and snapshot.admitted(o) and available(snapshot, r)
    ]


def latest_checkpoint(snapshot: Snapshot, job: str) -> CheckpointRecord | None:
    """The most advanced verified checkpoint of ``job`` in this run that a live peer provides.
    Replicas publish records too, so when the owner's newest is lost with it, the newest one a
    mirror still holds is the latest. Ties go by hash, then by the publisher's key: the owner's
    record and a mirror's copy of the same checkpoint differ only in their providers, and every
    peer reading the same snapshot must pick the same one, whatever order the DHT listed them in."""
    recs = [(o, r) for o, r in candidates(snapshot, job) if verdict(snapshot, job, r, o)]
    return max(recs, key=lambda p: (p[1].step, p[1].sha256, p[0]))[1] if recs else None


def to_mirror(snapshot: Snapshot, job: str, accepted_here: CheckpointRecord | None) -> CheckpointRecord | None:
    """The checkpoint of ``job`` a mirror should hold: the latest verified one, or the one this
    node accepted itself when that is more advanced and nobody trusted refused it. An owner that
    checkpoints faster than verifiers judge replaces each record before its verdict lands; the
    verifier's own copy is then the job's verified progress."""
    best = latest_checkpoint(snapshot, job)
    if (
        accepted_here is not None
        and accepted_here.run == snapshot.run.manifest_sha256
        and verdict(snapshot, job, accepted_here) is not False
        and (best is None or accepted_here.step > best.step)
    ):
        return accepted_here
    return best


def pending(snapshot: Snapshot, job: str) -> list[tuple[bytes, CheckpointRecord]]:
    """Records of ``job`` ahead of its latest verified checkpoint that no trusted verifier has
    judged yet, most advanced first: what a verifier looks at next."""
    best = latest_checkpoint(snapshot, job)
    out = [
        (o, r)
        for o, r in candidates(snapshot, job)
        if verdict(snapshot, job, r, o) is None and (best is None or r.step > best.step)
    ]
    return sorted(out, key=lambda item: (-item[1].step, item[1].sha256))


def done(snapshot: Snapshot, job: str) -> bool:
    """A job is done once a checkpoint at the run's target step is published and provided by a
    live peer (never without a target)."""
    target = snapshot.run.target(job)
    ck = latest_checkpoint(snapshot, job)
    return target > 0 and ck is not None and ck.step >= target


def run_complete(snapshot: Snapshot) -> bool:
    return all(done(snapshot, job) for job in snapshot.run.jobs())


def choose_job(snapshot: Snapshot, me: bytes, wanted: str | None = None) -> str | None:
    """The job this node should claim now, or ``None`` to wait.

    A job this node already wins is kept (until it is done). Otherwise: ``wanted`` if it is free;
    else one of the free, unfinished experts with the least training so far (lowest published
    step), and the router only once every expert has an owner or is done (it is the least urgent).
    The distill job is free only once every expert and the router are done: its teacher is them.
    """
    current = owners(snapshot)
    for job, owner in current.items():
        if owner == me and not done(snapshot, job):
            return job
    free = [job for job, owner in current.items() if owner is None and not done(snapshot, job)]
    if not teacher_done(snapshot):
        free = [job for job in free if not JobId.parse(job).is_distill]
    if wanted is not None:
        return wanted if wanted in free else None
    ids = {j: JobId.parse(j) for j in free}
    experts = [j for j in free if ids[j].is_expert]
    if experts:
        steps = {j: (ck.step if (ck := latest_checkpoint(snapshot, j)) else 0) for j in experts}
        least = sorted((j for j in experts if steps[j] == min(steps.values())), key=ids.__getitem__)
        # Nodes that start together read the same snapshot; a per-node pick among the equally
        # needed jobs spreads them out instead of all racing for the first one.
        return least[int.from_bytes(hashlib.sha256(me).digest()[:4], "big") % len(least)]
    return next((j for j in free if ids[j].is_router), None) or next((j for j in free if ids[j].is_distill), None)


def teacher_done(snapshot: Snapshot) -> bool:
    """Every expert and the router reached its target: the distill job's teacher is final."""
    return all(done(snapshot, job) for job in snapshot.run.jobs() if not JobId.parse(job).is_distill)


def still_wins(snapshot: Snapshot, job: str, me: bytes, mine: ClaimRecord | None = None) -> bool:
    """Checked after the settle time and at every renewal: keep training only while True.

    ``mine``: the claim this node has just renewed. A read that came back large, slow or cut short
    (a flood of records under the key) may lack it; the owner then still wins unless a valid claim
    that beats its own is in sight. It never stops because it could not see itself."""
    if mine is not None and me not in snapshot.claims.get(job, {}):
        seen = {**snapshot.claims.get(job, {}), me: mine}
        snapshot = dataclasses.replace(snapshot, claims={**snapshot.claims, job: seen})
    return winner(snapshot, job) == me

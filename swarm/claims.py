"""The claim rule (DESIGN.md §6) as pure functions of a DHT snapshot.

There is no compare-and-swap in a DHT, so ownership is decided by everyone the same way from
what they read: among the live claims of a job for this run, the winner is the one with the
smallest ``(t0, owner key)``. A node claims a free job, waits a settle time, re-reads, and
withdraws if it does not win; an owner re-checks at each renewal and stops once it no longer
wins. Expired claims vanish from the DHT by themselves, which frees the job for idle trainers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from swarm.records import CheckpointRecord, ClaimRecord, RunRecord


@dataclass
class Snapshot:
    """What a node read from the DHT at one moment (expired records already dropped)."""

    run: RunRecord
    claims: dict[str, dict[bytes, ClaimRecord]] = field(default_factory=dict)  # job → owner → claim
    ckpts: dict[str, dict[bytes, CheckpointRecord]] = field(default_factory=dict)  # job → owner → record
    # checkpoint sha256 → peers whose provider record is live (None: not read, every one counts)
    providers: dict[str, set[str]] | None = None

    def live_claims(self, job: str) -> dict[bytes, ClaimRecord]:
        """Claims of ``job`` for this run (records of other runs are ignored)."""
        return {o: c for o, c in self.claims.get(job, {}).items() if c.active and c.run == self.run.manifest_sha256}


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


def latest_checkpoint(snapshot: Snapshot, job: str) -> CheckpointRecord | None:
    """The most advanced checkpoint of ``job`` in this run that a live peer provides (ties: by
    hash, for determinism). Replicas publish records too, so when the owner's newest is lost with
    it, the newest one a mirror still holds is the latest."""
    recs = [
        r
        for r in snapshot.ckpts.get(job, {}).values()
        if r.run == snapshot.run.manifest_sha256 and available(snapshot, r)
    ]
    return max(recs, key=lambda r: (r.step, r.sha256)) if recs else None


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
    """
    current = owners(snapshot)
    for job, owner in current.items():
        if owner == me and not done(snapshot, job):
            return job
    free = [job for job, owner in current.items() if owner is None and not done(snapshot, job)]
    if wanted is not None:
        return wanted if wanted in free else None
    experts = [j for j in free if j != "router"]
    if experts:
        steps = {j: (ck.step if (ck := latest_checkpoint(snapshot, j)) else 0) for j in experts}
        least = sorted((j for j in experts if steps[j] == min(steps.values())), key=lambda j: int(j.split("_")[1]))
        # Nodes that start together read the same snapshot; a per-node pick among the equally
        # needed jobs spreads them out instead of all racing for the first one.
        return least[int.from_bytes(hashlib.sha256(me).digest()[:4], "big") % len(least)]
    return "router" if "router" in free else None


def still_wins(snapshot: Snapshot, job: str, me: bytes) -> bool:
    """Checked after the settle time and at every renewal: keep training only while True."""
    return winner(snapshot, job) == me

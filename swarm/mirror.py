"""Published checkpoints: publishing one (blobs first, then its record), where one can be
fetched from, and the mirror that keeps the latest checkpoint of every job on this node.

Idle trainers and the preparer mirror every job, so a job outlives its owner; a client mirrors
the router and the experts it runs itself. A mirror folder has the layout of a local run
(``<folder>/expert_K/step_N``, ``<folder>/router/step_N``), so it loads like one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from data.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from swarm import claims
from swarm.blobs import BlobError, BlobService, BlobStore, announce, providers
from swarm.dht import SwarmNode
from swarm.records import CKPT_TTL_S, CheckpointRecord, RunRecord, ckpt_key

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]


def sources(node: SwarmNode, digest: str, extra: list[str] = ()) -> list[str]:
    """Peers to fetch ``digest`` from: ``extra`` first (e.g. a record's providers), then every
    announced provider; never this node itself."""
    return [p for p in dict.fromkeys([*extra, *providers(node, digest)]) if p != node.peer_id]


def mirror_checkpoints(
    node: SwarmNode,
    blobs: BlobService,
    snap: claims.Snapshot,
    folder: Path,
    jobs: list[str] | None = None,
    publish: bool = False,
    accepted: dict[str, CheckpointRecord] | None = None,
) -> dict[str, Checkpoint | str]:
    """Hold (and provide) the latest published checkpoint of each job (default: all of the run).

    Returns, per job with a published checkpoint, the verified local copy, or the reason it
    could not be had (then the other jobs still go on). A copy already on disk is verified and
    reused; older copies of a job are deleted. With ``publish`` (long-lived mirrors: idle
    trainers, the preparer) this node also publishes a record of the copy under its own key, so
    the job's progress stays findable when its owner and the owner's record are gone.
    ``accepted``: the checkpoints this node's verifier accepted (and fetched), per job; one more
    advanced than the latest on record is held instead (:func:`claims.to_mirror`).
    """
    out: dict[str, Checkpoint | str] = {}
    for job in jobs or snap.run.jobs():
        rec = claims.to_mirror(snap, job, (accepted or {}).get(job))
        if rec is None:
            continue
        dest = folder / job / f"step_{rec.step:08d}"
        held = blobs.store.path(rec.sha256)
        if held is not None and held.is_file():  # verified when added: no need to hash it every round
            if held.parent.resolve() == dest.resolve():
                out[job] = Checkpoint(dest, json.loads(held.read_bytes()), rec.sha256)
                if publish:
                    _publish_replica(node, snap, job, rec)
                _drop_others(folder / job, dest)  # e.g. copies the verifier accepted before this one
            continue  # else held elsewhere (this trainer's own checkpoint): nothing to mirror
        try:
            try:
                got = verify_checkpoint(dest, expected_sha256=rec.sha256)
                blobs.store.add_checkpoint(got)
            except CheckpointError:
                got = blobs.fetch_checkpoint(rec.sha256, sources(node, rec.sha256, rec.providers), dest)
        except (BlobError, CheckpointError) as e:
            console.log(f"mirror of {job} step {rec.step} failed: {e}")
            out[job] = str(e)
            continue
        out[job] = got
        announce(node, blobs.store, only={got.sha256, *got.meta["files"].values()})
        if publish:
            _publish_replica(node, snap, job, rec)
        _drop_others(folder / job, dest)
    return out


def _drop_others(folder: Path, keep: Path) -> None:
    """Delete every copy of the job but ``keep``: older ones, and any a verifier fetched and then
    saw refused by someone it trusts."""
    for old in sorted(folder.glob("step_*")):
        if old.resolve() != keep.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _publish_replica(node: SwarmNode, snap: claims.Snapshot, job: str, rec: CheckpointRecord) -> None:
    mine = snap.ckpts.get(job, {}).get(node.owner)
    if mine is None or mine.sha256 != rec.sha256 or mine.providers != [node.peer_id]:
        node.store(ckpt_key(job), replace(rec, providers=[node.peer_id]), CKPT_TTL_S)


def fetch_published(node: SwarmNode, blobs: BlobService, run, folder: Path, jobs: list[str]) -> dict[str, Checkpoint]:
    """Fetch the latest published checkpoint of each of ``jobs`` into ``folder`` (verified, or
    reused if already there). The router is required; an expert that cannot be had is left out."""
    from swarm.dht import SwarmError

    got = mirror_checkpoints(node, blobs, node.snapshot(run, jobs), folder, jobs)
    if "router" in jobs and not isinstance(got.get("router"), Checkpoint):
        raise SwarmError(f"the router's checkpoint could not be had: {got.get('router') or 'none is published yet'}")
    return {job: ck for job, ck in got.items() if isinstance(ck, Checkpoint)}


def publish_checkpoint(node: SwarmNode, store: BlobStore, run: RunRecord, job: str, ckpt: Checkpoint) -> None:
    """Provide a checkpoint's blobs, then publish its record {step, sha256, size, ...} under ``job``."""
    store.add_checkpoint(ckpt)
    size = (
        sum((ckpt.path / rel).stat().st_size for rel in ckpt.meta["files"]) + (ckpt.path / "meta.json").stat().st_size
    )
    objective = ckpt.meta.get("objective", "fm") if job != "router" else "router"
    preset = ckpt.meta["preset"]["name"] if job != "router" else ckpt.meta["router_preset"]["name"]
    loss = float(ckpt.meta.get("loss") or 0.0)
    rec = CheckpointRecord(run.manifest_sha256, ckpt.step, ckpt.sha256, size, objective, preset, loss, [node.peer_id])
    announce(node, store, only={ckpt.sha256, *ckpt.meta["files"].values()})
    node.store(ckpt_key(job), rec, CKPT_TTL_S)  # after its blobs are findable

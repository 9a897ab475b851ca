"""Published checkpoints: publishing one (blobs first, then its record), where one can be
fetched from, how many bytes one may take, and the mirror that keeps the latest checkpoint of
every job on this node.

Idle trainers and the preparer mirror every job, so a job outlives its owner; a client mirrors
the router and the experts it runs itself. A mirror folder has the layout of a local run
(``<folder>/expert_K/step_N``, ``<folder>/router/step_N``), so it loads like one.

A checkpoint's size is a function of its preset (:func:`checkpoint_budget`: the job's network
counted on the ``meta`` device, no weight allocated), so a record that claims more is a lie, and
a fetch never writes more than the record and its preset allow (:func:`fetch_budget`).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from data.checkpoint import META_NAME, Checkpoint, CheckpointError, max_checkpoint_bytes, verify_checkpoint
from data.job_id import JobId
from swarm import claims
from swarm.blobs import MAX_CHECKPOINT, BlobError, BlobService, BlobStore, announce, providers
from swarm.dht import SwarmNode
from swarm.records import CKPT_TTL_S, CheckpointRecord, RunRecord, ckpt_key

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]

# The widest text encoder a network may read: its width sizes the experts' caption projection and
# a text router's prompt embedding (T5-XXL's 4096; CLIP ViT-L is 768, MiniLM 384).
MAX_TEXT_DIM = 4096


def checkpoint_budget(run: RunRecord, job: str, preset: str) -> int:
    """The most bytes a plausible checkpoint of ``job`` in ``run`` with ``preset`` (the record's:
    an expert preset, or for the router a router preset) takes: :func:`max_checkpoint_bytes` of the
    job's network with the widest text encoder (:data:`MAX_TEXT_DIM`); a router's is sized by the
    run's experts' space and count. Pure and cached; ``ValueError`` for a preset nobody knows."""
    if job != "router":
        return _budget("expert", preset, 0, 0, 0)
    from experts.presets import get_preset

    spaces = {(get_preset(p).channels, get_preset(p).sample_size) for p in run.presets}
    return max(_budget("router", preset, c, side, run.num_clusters) for c, side in spaces)


@functools.lru_cache(maxsize=128)
def _budget(kind: str, preset: str, channels: int, side: int, experts: int) -> int:
    import torch

    from experts.presets import build_expert, get_preset
    from router.network import build_router, get_router_preset

    with torch.device("meta"):  # shapes only (XL/2 costs no memory and ~0.1 s); this thread's alone
        if kind == "router":
            net = build_router(get_router_preset(preset), experts, channels, side, text_dim=MAX_TEXT_DIM)
        else:
            net = build_expert(get_preset(preset), MAX_TEXT_DIM)
    return max_checkpoint_bytes(net)


def fetch_budget(snap: claims.Snapshot, job: str, rec: CheckpointRecord) -> int:
    """The byte budget to fetch ``rec``'s checkpoint with: the largest size any record of its hash
    in ``job`` claims, never beyond what its preset allows. The largest, not ``rec``'s own: a
    provider announcing more than the budget is banned, and a stranger's record that understates
    an honest checkpoint must not get that checkpoint's honest providers banned."""
    claimed = max([rec.size, *(r.size for r in snap.ckpts.get(job, {}).values() if r.sha256 == rec.sha256)])
    try:
        return min(claimed, checkpoint_budget(snap.run, job, rec.preset))
    except ValueError:  # a preset nobody knows: the verifier refuses such a record without a fetch
        return min(claimed, MAX_CHECKPOINT)


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
                    _publish_replica(node, blobs.store, snap, job, rec, out[job])
                _drop_others(folder / job, dest)  # e.g. copies the verifier accepted before this one
            continue  # else held elsewhere (this trainer's own checkpoint): nothing to mirror
        try:
            try:
                got = verify_checkpoint(dest, expected_sha256=rec.sha256)
                blobs.store.add_checkpoint(got)
            except CheckpointError:
                budget = fetch_budget(snap, job, rec)
                got = blobs.fetch_checkpoint(rec.sha256, sources(node, rec.sha256, rec.providers), dest, budget)
        except (BlobError, CheckpointError) as e:
            console.log(f"mirror of {job} step {rec.step} failed: {e}")
            out[job] = str(e)
            continue
        out[job] = got
        announce(node, blobs.store, only={got.sha256, *got.meta["files"].values()})
        if publish:
            _publish_replica(node, blobs.store, snap, job, rec, got)
        _drop_others(folder / job, dest)
    return out


def _drop_others(folder: Path, keep: Path) -> None:
    """Delete every copy of the job but ``keep``: older ones, and any a verifier fetched and then
    saw refused by someone it trusts."""
    for old in sorted(folder.glob("step_*")):
        if old.resolve() != keep.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _publish_replica(
    node: SwarmNode, blobs_store: BlobStore, snap: claims.Snapshot, job: str, rec: CheckpointRecord, ckpt: Checkpoint
) -> None:
    # The size is the copy's own, never the record's: a stranger's record of the same hash may
    # understate it, and a replica must not pass that on under this node's key (fetch_budget).
    mine = snap.ckpts.get(job, {}).get(node.owner)
    try:
        size = checkpoint_size(ckpt)
    except OSError:  # a file of the copy went away (pruned): nothing to vouch for this round
        return
    if mine is None or mine.sha256 != rec.sha256 or mine.providers != [node.peer_id] or mine.size != size:
        # Provide it before the record names this node: a trainer waiting to release its job
        # counts the providers, and the periodic announcement may be most of a minute away.
        announce(node, blobs_store, only={ckpt.sha256, *ckpt.meta["files"].values()})
        node.store(ckpt_key(job), replace(rec, size=size, providers=[node.peer_id]), CKPT_TTL_S)


def checkpoint_size(ckpt: Checkpoint) -> int:
    """The bytes of a checkpoint folder: meta.json and every file it lists (what a record's size says)."""
    return sum((ckpt.path / rel).stat().st_size for rel in ckpt.meta["files"]) + (ckpt.path / META_NAME).stat().st_size


def fetch_published(node: SwarmNode, blobs: BlobService, run, folder: Path, jobs: list[str]) -> dict[str, Checkpoint]:
    """Fetch the latest published checkpoint of each of ``jobs`` into ``folder`` (verified, or
    reused if already there). The router is required; an expert that cannot be had is left out."""
    from swarm.dht import SwarmError

    got = mirror_checkpoints(node, blobs, node.snapshot(run, jobs), folder, jobs)
    if "router" in jobs and not isinstance(got.get("router"), Checkpoint):
        raise SwarmError(f"the router's checkpoint could not be had: {got.get('router') or 'none is published yet'}")
    return {job: ck for job, ck in got.items() if isinstance(ck, Checkpoint)}


def gather_teacher(node: SwarmNode, blobs: BlobService, snap: claims.Snapshot, mirror: Path, dest: Path) -> Path:
    """The distill job's teacher under ``dest`` (``expert_K/``, ``router/``, as links): the latest
    verified checkpoint of every expert and the router, fetched into ``mirror`` unless this node
    holds it already (trained or verified here, used where it lies). ``CheckpointError`` if one
    cannot be had."""
    jobs = [j for j in snap.run.jobs() if not JobId.parse(j).is_distill]
    got = mirror_checkpoints(node, blobs, snap, mirror, jobs)
    shutil.rmtree(dest, ignore_errors=True)
    for job in jobs:
        rec = claims.latest_checkpoint(snap, job)
        held = blobs.store.path(rec.sha256) if rec is not None else None  # its meta.json
        if held is None:
            raise CheckpointError(f"the teacher's {job} could not be had: {got.get(job) or 'none is verified'}")
        (dest / job).mkdir(parents=True)
        (dest / job / held.parent.name).symlink_to(held.parent.resolve(), target_is_directory=True)
    return dest


def publish_checkpoint(node: SwarmNode, store: BlobStore, run: RunRecord, job: str, ckpt: Checkpoint) -> None:
    """Provide a checkpoint's blobs, then publish its record {step, sha256, size, ...} under ``job``."""
    store.add_checkpoint(ckpt)
    size = checkpoint_size(ckpt)
    objective = ckpt.meta.get("objective", "fm") if job != "router" else "router"
    preset = ckpt.meta["preset"]["name"] if job != "router" else ckpt.meta["router_preset"]["name"]
    loss = float(ckpt.meta.get("loss") or 0.0)
    rec = CheckpointRecord(run.manifest_sha256, ckpt.step, ckpt.sha256, size, objective, preset, loss, [node.peer_id])
    announce(node, store, only={ckpt.sha256, *ckpt.meta["files"].values()})
    node.store(ckpt_key(job), rec, CKPT_TTL_S)  # after its blobs are findable

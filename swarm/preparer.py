"""The preparer's swarm role (``--role prepare --serve``): publish the run record and provide the
run's manifest and shards by sha256, publish checkpoints trained here when they are ahead of the
swarm's, and mirror every job's latest checkpoint, until stopped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.console import Console

from data.checkpoint import CheckpointError, latest_checkpoint
from data.manifest import load_manifest
from swarm import claims
from swarm.blobs import BlobService, BlobStore, announce
from swarm.dht import SwarmNode
from swarm.mirror import mirror_checkpoints, publish_checkpoint
from swarm.records import PROVIDER_TTL_S, RUN_TTL_S, PeerRecord, RunRecord, peers_key, run_key

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]


def serve_run(
    node: SwarmNode,
    data_dir: Path,
    stop: threading.Event,
    expert_steps: int = 0,
    router_steps: int = 0,
    period_s: float = 2.0,  # mirror rounds: a stopping trainer waits for one
    ckpt_dir: Path | None = None,
) -> None:
    """The preparer's side: publish the run record (with the run's step targets, 0 = none) and
    provide the manifest and shards; publish checkpoints trained here (``ckpt_dir``, e.g. with
    ``--local``) when they are ahead of the swarm's; mirror every job's latest; until stopped."""
    manifest, digest = load_manifest(data_dir)
    store = BlobStore()
    store.add_file(data_dir / "manifest.json", digest)
    for c in manifest.clusters:
        for entry in c.shards + c.holdout:
            url = manifest.resolve(entry.url)
            if Path(url).is_file():
                store.add_file(Path(url), entry.sha256)
    blobs = BlobService(node.dht, store)
    run = RunRecord(
        digest,
        manifest.num_clusters,
        [c.preset for c in manifest.clusters],
        [c.objective for c in manifest.clusters],
        (data_dir / "manifest.json").stat().st_size,
        expert_steps,
        router_steps,
    )
    last_announce = 0.0
    try:
        while True:
            if time.monotonic() - last_announce > min(RUN_TTL_S, PROVIDER_TTL_S) / 3:
                node.store(run_key(), run, RUN_TTL_S)
                # Trainers hold a job until a mirror has its last checkpoint; this says one is up.
                node.store(peers_key(), PeerRecord(node.peer_id, "preparer", "mirroring"), PROVIDER_TTL_S)
                announce(node, store)
                if ckpt_dir is not None:
                    _publish_local(node, blobs.store, run, ckpt_dir)
                last_announce = time.monotonic()
            mirror_checkpoints(node, blobs, node.snapshot(run), data_dir.parent / "mirror", publish=True)
            if stop.wait(period_s):
                break
    finally:
        try:
            node.store(peers_key(), PeerRecord(node.peer_id, "preparer", "offline"), PROVIDER_TTL_S)
        except Exception:  # shutting down; the record expires by itself
            pass
        blobs.shutdown()


def _publish_local(node: SwarmNode, store: BlobStore, run: RunRecord, ckpt_dir: Path) -> None:
    snap = node.snapshot(run)
    for job in run.jobs():
        try:
            ck = latest_checkpoint(ckpt_dir / job)
        except CheckpointError as e:
            console.log(f"not publishing {job}: {e}")
            continue
        if ck is None or ck.meta.get("manifest_sha256") != run.manifest_sha256:
            continue
        rec = claims.latest_checkpoint(snap, job)
        if rec is None or rec.step < ck.step or rec.sha256 == ck.sha256:
            if rec is None or rec.sha256 != ck.sha256:
                console.log(f"publishing local checkpoint of {job}: step {ck.step} ({ck.sha256[:12]})")
            publish_checkpoint(node, store, run, job, ck)

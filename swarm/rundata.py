"""A run's data fetched from the swarm by sha256: its manifest, and the shards of some clusters
(all of them for a trainer, only the held-out ones for a verifier)."""

from __future__ import annotations

from pathlib import Path

from data.manifest import Manifest, load_manifest, sha256_file
from swarm.blobs import BlobError, BlobService
from swarm.dht import SwarmNode
from swarm.mirror import sources
from swarm.records import RunRecord


def fetch_manifest(node: SwarmNode, blobs: BlobService, work: Path, run: RunRecord) -> tuple[Manifest, str]:
    """The run's manifest under ``work/data/<hash prefix>/``, fetched unless already there."""
    path = work / "data" / run.manifest_sha256[:12] / "manifest.json"
    if not (path.is_file() and sha256_file(path) == run.manifest_sha256):
        blobs.fetch(run.manifest_sha256, sources(node, run.manifest_sha256), path)
    blobs.store.add_file(path, run.manifest_sha256)
    manifest, digest = load_manifest(path)
    if digest != run.manifest_sha256:
        raise BlobError(f"manifest hash {digest[:12]} differs from the run's {run.manifest_sha256[:12]}")
    return manifest, digest


def fetch_shards(
    node: SwarmNode, blobs: BlobService, manifest: Manifest, clusters: list[int], holdout_only: bool = False
) -> None:
    """Fetch the shards of ``clusters`` by sha256 (remote URLs are streamed by webdataset instead)."""
    for c in clusters:
        entries = (
            manifest.clusters[c].holdout if holdout_only else manifest.clusters[c].shards + manifest.clusters[c].holdout
        )
        for entry in entries:
            url = manifest.resolve(entry.url)
            if "://" in url or url.startswith("pipe:"):
                continue
            dest = Path(url)
            if not dest.resolve().is_relative_to(manifest.root.resolve()):
                raise BlobError(f"manifest shard path escapes its folder: {entry.url!r}")
            if not (dest.is_file() and sha256_file(dest) == entry.sha256):
                blobs.fetch(entry.sha256, sources(node, entry.sha256), dest)
            blobs.store.add_file(dest, entry.sha256)

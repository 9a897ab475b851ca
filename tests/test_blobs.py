"""Blob transfer between real peers on 127.0.0.1: checkpoints arrive verified; a provider that
sends a flipped byte is refused (nothing of it is kept or loaded) and the next one is tried."""

import shutil

import pytest

from data.checkpoint import save_checkpoint, verify_checkpoint
from router.network import RouterNet
from swarm.bans import Bans
from swarm.blobs import BlobError, BlobService, BlobStore
from swarm.dht import SwarmConfig, SwarmNode

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def peers(tmp_path):
    nodes, services = [], []
    try:
        first = None
        for name in ("honest", "corrupt", "fetcher"):
            n = SwarmNode(
                SwarmConfig(str(tmp_path / name), initial_peers=first.maddrs() if first else [], host_maddrs=LOOPBACK)
            )
            first = first or n
            nodes.append(n)
            services.append(BlobService(n.dht, BlobStore(), timeout=30))
        yield nodes, services
    finally:
        for s in services:
            s.shutdown()
        for n in reversed(nodes):
            n.shutdown()


def test_checkpoint_transfer_verifies_and_refuses_a_flipped_byte(peers, tmp_path):
    (honest, corrupt, _), (honest_svc, corrupt_svc, fetch_svc) = peers
    model = RouterNet(num_experts=2, in_channels=3, sample_size=8, hidden=32, layers=2, heads=2, patch=4)
    ckpt = save_checkpoint(tmp_path / "src", 7, model, {"kind": "router"})
    honest_svc.store.add_checkpoint(ckpt)

    # The corrupt provider claims the same hashes but holds one flipped byte in the weights.
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.path, bad)
    weights = next((bad / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x10
    weights.write_bytes(bytes(data))
    corrupt_svc.store.add_file(bad / "meta.json", ckpt.sha256)
    for rel, digest in ckpt.meta["files"].items():
        corrupt_svc.store.add_file(bad / rel, digest)

    with pytest.raises(BlobError, match="does not match"):
        fetch_svc.fetch_checkpoint(ckpt.sha256, [corrupt.peer_id], tmp_path / "only_bad")
    assert not (tmp_path / "only_bad").exists()  # nothing of it kept, not even its meta.json
    assert not list(tmp_path.glob(".fetching-*"))
    # ... and the sender is banned here: skipped, not asked again, until the ban lapses.
    assert fetch_svc.bans.banned(corrupt.peer_id)
    with pytest.raises(BlobError, match="banned here"):
        fetch_svc.fetch_checkpoint(ckpt.sha256, [corrupt.peer_id], tmp_path / "only_bad")
    fetch_svc.bans = Bans()  # the ban lapsed

    # A transfer cut short (the provider serves meta.json, then its weights file is gone: as when
    # it dies halfway) leaves no folder that looks like a checkpoint.
    (bad / "model" / weights.name).unlink()
    with pytest.raises(BlobError, match="does not have"):
        fetch_svc.fetch_checkpoint(ckpt.sha256, [corrupt.peer_id], tmp_path / "cut")
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".fetching-*"))

    got = fetch_svc.fetch_checkpoint(ckpt.sha256, [corrupt.peer_id, honest.peer_id], tmp_path / "dst")
    assert got.sha256 == ckpt.sha256 and got.step == 7
    verify_checkpoint(got.path, expected_sha256=ckpt.sha256)
    assert (got.path / "model" / weights.name).read_bytes() == (ckpt.path / "model" / weights.name).read_bytes()


def test_missing_blob_and_unknown_peer_give_a_clear_error(peers, tmp_path):
    (honest, _, _), (_, _, fetch_svc) = peers
    with pytest.raises(BlobError, match="does not have"):
        fetch_svc.fetch("0" * 64, [honest.peer_id], tmp_path / "x")

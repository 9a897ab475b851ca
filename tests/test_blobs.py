"""Blob transfer between real peers on 127.0.0.1: checkpoints arrive verified; a provider that
sends a flipped byte is refused (nothing of it is kept or loaded) and the next one is tried. A
fetch stops at its byte budget, and a checkpoint's budget is a function of its preset that real
checkpoints of the tiny presets fit (tests/test_blob_attacks.py has the adversaries)."""

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data.checkpoint import Checkpoint, save_checkpoint, verify_checkpoint
from data.streaming import Batch, DataPosition
from experts.presets import EXPERT_PRESETS, build_expert, expert_forward, get_preset
from router.network import RouterNet, build_router, get_router_preset
from router.presets import ROUTER_PRESETS
from swarm import claims
from swarm.bans import Bans
from swarm.blobs import MAX_CHECKPOINT, BlobError, BlobService, BlobStore
from swarm.claims import Snapshot
from swarm.dht import SwarmConfig, SwarmNode
from swarm.mirror import checkpoint_budget, fetch_budget, mirror_checkpoints
from swarm.records import CheckpointRecord, RunRecord, ckpt_key
from training.loop import TrainConfig, train

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


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _two_files(tmp_path: Path):
    """A small checkpoint of three files (config, weights, training state) and its total size."""
    model = RouterNet(num_experts=2, in_channels=3, sample_size=8, hidden=32, layers=2, heads=2, patch=4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "src", 3, model, {"kind": "router"}, state)
    return ckpt, _folder_bytes(ckpt.path)


def test_a_fetch_stops_at_its_budget(peers, tmp_path):
    """Every file of a checkpoint counts against one budget; a provider whose reply announces
    more than what is left is refused before a byte of it is written, and banned. The exact size
    is enough."""
    (honest, _, _), (honest_svc, _, fetch_svc) = peers
    ckpt, size = _two_files(tmp_path)
    honest_svc.store.add_checkpoint(ckpt)

    with pytest.raises(BlobError, match="over the budget"):
        fetch_svc.fetch_checkpoint(ckpt.sha256, [honest.peer_id], tmp_path / "dst", max_bytes=size - 1)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".fetching-*"))
    assert fetch_svc.bans.banned(honest.peer_id)  # it is the budget's to be right: see fetch_budget
    fetch_svc.bans = Bans()

    weights = next(d for rel, d in ckpt.meta["files"].items() if rel.endswith("model.safetensors"))
    one = tmp_path / "one" / "w.safetensors"
    with pytest.raises(BlobError, match="over the budget"):
        fetch_svc.fetch(weights, [honest.peer_id], one, max_bytes=100)
    assert not one.parent.exists() or not list(one.parent.iterdir())  # not even a .part
    fetch_svc.bans = Bans()

    got = fetch_svc.fetch_checkpoint(ckpt.sha256, [honest.peer_id], tmp_path / "dst", max_bytes=size)
    assert got.sha256 == ckpt.sha256 and _folder_bytes(got.path) == size


def test_fetch_budget_takes_the_largest_claim_within_the_preset():
    """A record that understates its checkpoint does not shrink the budget (that would get the
    checkpoint's honest providers banned); one that overstates it is held to its preset's bound."""
    run = RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "fm"], 1)
    bound = checkpoint_budget(run, "expert_0", "tiny")

    def rec(size: int, sha: str = "c" * 64) -> CheckpointRecord:
        return CheckpointRecord(run.manifest_sha256, 5, sha, size, "fm", "tiny", 0.1, [])

    honest, liar, other = rec(36_000_000), rec(1), rec(40_000_000, "d" * 64)
    snap = SimpleNamespace(run=run, ckpts={"expert_0": {b"h": honest, b"l": liar, b"o": other}})
    assert fetch_budget(snap, "expert_0", liar) == fetch_budget(snap, "expert_0", honest) == honest.size
    assert fetch_budget(snap, "expert_0", rec(50 << 30)) == bound  # the attack: 50 GB for a 36 MB preset
    unknown = CheckpointRecord(run.manifest_sha256, 5, "e" * 64, 50 << 30, "fm", "huge", 0.1, [])
    assert fetch_budget(SimpleNamespace(run=run, ckpts={}), "expert_0", unknown) == MAX_CHECKPOINT


def test_every_preset_fits_the_default_checkpoint_budget():
    """A fetch given no budget still refuses what no preset could be (XL/2 is ~12 GB)."""
    small = RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "fm"], 1)
    large = RunRecord("a" * 64, 64, ["XL/2"] * 64, ["fm"] * 64, 1)
    sizes = [checkpoint_budget(small, "expert_0", p) for p in EXPERT_PRESETS]
    sizes += [checkpoint_budget(r, "router", p) for r in (small, large) for p in ROUTER_PRESETS]
    assert max(sizes) <= MAX_CHECKPOINT
    assert checkpoint_budget(small, "expert_0", "XL/2") > 10e9  # 606M parameters, five copies
    with pytest.raises(ValueError, match="unknown"):
        checkpoint_budget(small, "expert_0", "XXL")
    with pytest.raises(ValueError, match="unknown"):
        checkpoint_budget(small, "router", "tiny16")  # an expert preset is no router preset


MINILM_DIM = 384  # the default text encoder's width: what real tiny checkpoints are trained with


class _RealJob:
    """A tiny preset's real network trained by the real loop for two steps on random data, so its
    checkpoint holds what a trainer's does (sampling weights, raw weights, EMA, AdamW state)."""

    name, batch_size, lr, warmup_steps = "sized", 2, 1e-3, 0

    def __init__(self, job: str, preset: str) -> None:
        self.job, self.preset = job, preset
        if job == "router":
            rp = get_router_preset(preset)
            self.model = build_router(rp, 2, 3, 32, text_dim=MINILM_DIM if rp.text else 0)
        else:
            self.model = build_expert(get_preset(preset), MINILM_DIM)
        side = 32 if job == "router" else get_preset(preset).sample_size
        self.images = torch.randn(2, 3, side, side)

    def batches(self, start: DataPosition) -> Iterator[Batch]:
        i = start.index
        while True:
            i += 2
            yield Batch(self.images, ["x", "y"], torch.tensor([0, 1]), DataPosition(0, i))

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x = batch.images
        if self.job == "router":
            text = torch.randn(2, MINILM_DIM) if self.model.reads_text else None
            return torch.nn.functional.cross_entropy(self.model(x, torch.full((2,), 500.0), text), batch.labels)
        states, mask = torch.randn(2, 8, MINILM_DIM), torch.ones(2, 8)
        return torch.nn.functional.mse_loss(expert_forward(self.model, x, torch.full((2,), 500.0), states, mask), x)

    def meta(self) -> dict:
        if self.job == "router":
            return {"kind": "router", "router_preset": get_router_preset(self.preset).to_dict(), "num_experts": 2}
        return {"kind": "expert", "preset": get_preset(self.preset).to_dict(), "objective": "fm", "cluster": 0}


@pytest.mark.parametrize(
    "job,preset", [("expert_0", "tiny"), ("expert_0", "tiny16"), ("router", "tiny"), ("router", "tiny-text")]
)
def test_checkpoint_budget_bounds_real_checkpoints(job, preset, tmp_path):
    """The bound holds a real checkpoint of the tiny presets, and not with absurd room: a record
    claiming twice its preset's size is refused by it."""
    cfg = TrainConfig(ckpt_root=str(tmp_path), steps=2, batch_size=2, log_every=1)
    ckpt = train(_RealJob(job, preset), cfg)
    assert ckpt is not None and ckpt.step == 2 and ckpt.meta["loss_history"]
    real = _folder_bytes(ckpt.path)
    bound = checkpoint_budget(RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "fm"], 1), job, preset)
    assert real <= bound < 2 * real, (real, bound)


def test_a_record_that_understates_a_checkpoint_gets_no_honest_provider_banned(peers, tmp_path):
    """A stranger republishes an honest checkpoint's record with size 1. A mirror that picks that
    record still fetches with the honest record's size as its budget (banning nobody), and its own
    replica record states the copy's real size, not the lie."""
    (honest, _, first), (honest_svc, _, _) = peers
    ckpt, size = _two_files(tmp_path)
    honest_svc.store.add_checkpoint(ckpt)
    mirror = SwarmNode(
        SwarmConfig(str(tmp_path / "mirror"), initial_peers=first.maddrs(), host_maddrs=LOOPBACK, own_run="sized")
    )
    blobs = BlobService(mirror.dht, BlobStore(), timeout=30, bans=mirror.bans)
    try:
        run = RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "fm"], 1)
        true = CheckpointRecord(run.manifest_sha256, 3, ckpt.sha256, size, "router", "tiny", 0.1, [honest.peer_id])
        lie = replace(true, size=1)
        snap = Snapshot(run, ckpts={"router": {b"honest key": true, b"~stranger key": lie}})
        assert claims.to_mirror(snap, "router", None) == lie  # the one a mirror would hold
        got = mirror_checkpoints(mirror, blobs, snap, tmp_path / "held", jobs=["router"], publish=True)
        assert isinstance(got["router"], Checkpoint), got
        assert not mirror.bans.banned(honest.peer_id)
        assert mirror.read(ckpt_key("router"), CheckpointRecord)[mirror.owner].size == size
    finally:
        blobs.shutdown()
        mirror.shutdown()

"""Streaming: batches over several clusters are mixed, and positions resume exactly."""

import torch

from data.manifest import load_manifest
from data.streaming import DataPosition, stream_batches


def test_multi_cluster_batches_are_mixed_and_resume_exactly(small_run):
    manifest, _ = load_manifest(small_run / "data")
    it = stream_batches(manifest, [0, 1], 32, 32, seed=5)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert len(set(b.labels.tolist())) == 2  # never a batch of one cluster
    counts = torch.bincount(torch.cat([b.labels for b in batches]), minlength=2).float()
    sizes = torch.tensor([c.samples for c in manifest.clusters], dtype=torch.float)
    assert torch.allclose(counts / counts.sum(), sizes / sizes.sum(), atol=0.12)  # the data's own proportions

    resumed = stream_batches(manifest, [0, 1], 32, 32, seed=5, start=DataPosition(**batches[2].position.to_dict()))
    for expected in batches[3:]:
        got = next(resumed)
        assert got.captions == expected.captions and torch.equal(got.images, expected.images)


def test_single_cluster_resume_crosses_epochs_exactly(small_run):
    manifest, _ = load_manifest(small_run / "data")
    n = manifest.clusters[1].samples
    it = stream_batches(manifest, [1], 16, 32, seed=1)
    batches = [next(it) for _ in range(n // 16 + 3)]  # runs past the end of the first epoch
    assert batches[-1].position.epoch >= 1
    mid = batches[n // 16 - 1].position
    resumed = stream_batches(manifest, [1], 16, 32, seed=1, start=DataPosition(**mid.to_dict()))
    for expected in batches[n // 16 :]:
        assert next(resumed).captions == expected.captions


def test_default_twemoji_leaves_out_skin_tone_variants_and_all_keeps_them():
    from data.sources import SKIN_TONES, open_source

    default = [it.key for it in open_source("twemoji", 600)]
    everything = [it.key for it in open_source("twemoji:all", 600)]
    toned = [k for k in everything if SKIN_TONES.intersection(k.removeprefix("twemoji_").split("-"))]
    assert toned and not SKIN_TONES.intersection("-".join(default).replace("twemoji_", "").split("-"))
    plain = [k for k in everything if k not in toned]
    assert len(default) == 600 and default[: len(plain)] == plain  # the same order, only the variants gone

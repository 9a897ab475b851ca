"""Batches decoded by worker processes come in the stream's exact order, and resume exactly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from data.manifest import load_manifest
from data.streaming import DataPosition, stream_batches
from training.jobs import build_job
from training.loader import load_batches
from training.loop import TrainConfig, train


class StreamJob:
    """Just the data side of a job: one cluster, or the size-weighted mix of all of them."""

    def __init__(self, run: Path, clusters: list[int]) -> None:
        self.manifest, _ = load_manifest(run / "data")
        self.clusters = clusters

    def batches(self, start: DataPosition, decode: bool = True):
        m = self.manifest
        return stream_batches(m, self.clusters, 8, m.image_size, seed=3, start=start, decode=decode)


def take(batches, n: int) -> list:
    return list(itertools.islice(batches, n))


def same(a, b) -> None:
    assert [x.captions for x in a] == [y.captions for y in b]
    assert [x.position for x in a] == [y.position for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.states, y.states) and torch.equal(x.mask, y.mask)


@pytest.mark.parametrize("clusters", [[0], [0, 1]], ids=["one cluster", "mix"])
def test_workers_give_the_same_batches_and_resume_exactly(small_run: Path, clusters: list[int]) -> None:
    job = StreamJob(small_run, clusters)
    plain = take(load_batches(job, DataPosition(), workers=0), 7)
    with_workers = take(load_batches(job, DataPosition(), workers=2), 7)
    same(plain, with_workers)
    # Stopped after 3 batches, resumed from the position saved with the third: the same next batches.
    resumed = take(load_batches(job, plain[2].position, workers=1), 4)
    same(plain[3:], resumed)


def test_a_trainer_with_workers_saves_the_same_data_position(small_run: Path, tmp_path: Path) -> None:
    manifest, digest = load_manifest(small_run / "data")
    positions = []
    for workers in (0, 2):
        cfg = TrainConfig(ckpt_root=str(tmp_path / str(workers)), steps=3, batch_size=8, workers=workers)
        positions.append(train(build_job(manifest, digest, "expert_0", cfg), cfg).meta["data_position"])
    assert positions[0] == positions[1] and positions[0]["index"] == 24

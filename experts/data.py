"""Streaming a cluster's shards with webdataset, with a resumable data position.

An epoch is a deterministic permutation of shards and (through a seeded shuffle buffer) of
samples, so a position ``(epoch, index)`` saved in a checkpoint is enough to resume exactly
where training stopped. Shard bytes are untrusted: local shards are hash-checked against the
manifest before use, and images are decoded with Pillow only (never unpickled).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from experts.latent_space import pil_to_tensor
from experts.manifest import Manifest, ManifestError, ShardEntry, sha256_file


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # samples already consumed in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    captions: list[str]
    labels: torch.Tensor  # (B,) cluster ids
    position: DataPosition  # position after this batch


def verify_local_shards(manifest: Manifest, entries: list[ShardEntry]) -> None:
    """Hash-check shards that are local files; remote URLs are checked by whoever fetches them."""
    for e in entries:
        url = manifest.resolve(e.url)
        if "://" in url or url.startswith("pipe:"):
            continue
        if not Path(url).is_file():
            raise ManifestError(f"shard missing: {url}")
        if sha256_file(url) != e.sha256:
            raise ManifestError(f"shard {url} does not match its sha256 in the manifest; refusing to train on it")


def _samples(urls: list[str], rng: random.Random, shuffle_buffer: int) -> Iterator[dict]:
    import webdataset as wds

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        *([wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)] if shuffle_buffer > 1 else []),
    )
    return iter(pipeline)


def _decode(sample: dict, size: int, default_label: int) -> tuple[torch.Tensor, str, int]:
    img_bytes = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
    if img_bytes is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks an image or a caption")
    with Image.open(io.BytesIO(img_bytes)) as img:
        x = pil_to_tensor(img, size)
    label = default_label
    if "json" in sample:
        label = int(json.loads(sample["json"]).get("cluster", default_label))
    return x, sample["txt"].decode("utf-8"), label


def stream_batches(
    manifest: Manifest,
    clusters: list[int],
    batch_size: int,
    image_size: int,
    seed: int = 0,
    start: DataPosition | None = None,
    holdout: bool = False,
    epochs: int = 0,
    shuffle_buffer: int = 500,
) -> Iterator[Batch]:
    """Endless (or ``epochs``-long) batches over the shards of ``clusters``.

    The label of a sample is the cluster whose shard it came from, so the router learns the
    assignment the experts were trained on.
    """
    entries = [
        (c, s) for c in clusters for s in (manifest.clusters[c].holdout if holdout else manifest.clusters[c].shards)
    ]
    if not entries:
        raise ManifestError(f"no {'held-out' if holdout else 'training'} shards for clusters {clusters}")
    verify_local_shards(manifest, [s for _, s in entries])
    label_of = {manifest.resolve(s.url): c for c, s in entries}
    pos = DataPosition(**(start.to_dict() if start else {}))
    imgs: list[torch.Tensor] = []
    caps: list[str] = []
    labs: list[int] = []
    while not epochs or pos.epoch < epochs:
        rng = random.Random(seed * 100_003 + pos.epoch)
        urls = sorted(label_of)
        rng.shuffle(urls)
        n_in_epoch = 0
        for i, sample in enumerate(_samples(urls, rng, shuffle_buffer if not holdout else 0)):
            n_in_epoch += 1
            if i < pos.index:
                continue  # resuming: skip what was already consumed in this epoch
            x, cap, lab = _decode(sample, image_size, label_of.get(sample.get("__url__", ""), -1))
            imgs.append(x)
            caps.append(cap)
            labs.append(lab)
            pos = DataPosition(pos.epoch, i + 1)
            if len(imgs) == batch_size:
                yield Batch(torch.stack(imgs), caps, torch.tensor(labs), pos)
                imgs, caps, labs = [], [], []
        if n_in_epoch == 0:
            raise ManifestError(f"shards of clusters {clusters} hold no samples")
        pos = DataPosition(pos.epoch + 1, 0)
    if imgs:
        yield Batch(torch.stack(imgs), caps, torch.tensor(labs), pos)

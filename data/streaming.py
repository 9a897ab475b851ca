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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.manifest import Manifest, ManifestError, ShardEntry, sha256_file
from experts.latent_space import pil_to_tensor


@dataclass
class DataPosition:
    """Where a stream is: (epoch, index) of one cluster, or one such pair per cluster of a mix."""

    epoch: int = 0
    index: int = 0  # samples already consumed in this epoch
    mix: dict[str, list[int]] = field(default_factory=dict)  # cluster id → [epoch, index], for mixes
    drawn: int = 0  # samples drawn by a mix so far (re-seeds its cluster chooser on resume)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "mix": self.mix, "drawn": self.drawn}


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    captions: list[str]
    labels: torch.Tensor  # (B,) cluster ids
    position: DataPosition  # position after this batch
    latents: torch.Tensor | None = None  # (B, 2, C, h, w) posterior mean and std, when the shards hold them
    states: torch.Tensor | None = None  # (B, L, D) caption token states, when the shards hold them
    mask: torch.Tensor | None = None  # (B, L) 1 = real token
    offset: int = 0  # this batch's first row in the global batch of an island (0: alone)
    total: int = 0  # rows of that global batch (0: this batch is the whole of it)

    def draw(self, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``fn(n)`` drawn for the whole global batch, and this batch's rows of it: a loss's random
        numbers are the same however an island splits the batch."""
        n = len(self.captions)
        if not self.total or self.total == n:
            return fn(n)
        return fn(self.total)[self.offset : self.offset + n]

    def _map(self, fn) -> Batch:
        """The same batch with ``fn`` applied to each of its tensors."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(
            f(self.images),
            self.captions,
            f(self.labels),
            self.position,
            f(self.latents),
            f(self.states),
            f(self.mask),
            self.offset,
            self.total,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (what DataLoader's ``pin_memory`` calls on a custom batch)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        if torch.device(device).type == "cpu":
            return self
        # pinned host memory: the copy can overlap the GPU's work on the previous step
        return self._map(lambda t: t.pin_memory().to(device, non_blocking=True))


@dataclass
class Sample:
    """One decoded sample; ``latent``/``states`` only when the run's shards store them."""

    image: torch.Tensor
    caption: str
    label: int
    latent: torch.Tensor | None = None
    states: torch.Tensor | None = None  # (n, D): the caption's real tokens only


def collate(samples: list[Sample], position: DataPosition, text_tokens: int = 0) -> Batch:
    """Stack samples into a batch; text states are zero-padded to ``text_tokens`` and masked."""
    batch = Batch(
        torch.stack([s.image for s in samples]),
        [s.caption for s in samples],
        torch.tensor([s.label for s in samples]),
        position,
    )
    if samples[0].latent is not None:
        batch.latents = torch.stack([s.latent for s in samples])
    if samples[0].states is not None:
        dim = samples[0].states.shape[1]
        batch.states = torch.zeros(len(samples), text_tokens, dim)
        batch.mask = torch.zeros(len(samples), text_tokens, dtype=torch.long)
        for i, s in enumerate(samples):
            batch.states[i, : len(s.states)] = s.states
            batch.mask[i, : len(s.states)] = 1
    return batch


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


def _array(sample: dict, name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A stored ``.npy`` array of a sample, checked: never unpickled, float16, the expected shape, finite."""
    raw = sample.get(name)
    if raw is None:
        raise ManifestError(f"sample {sample.get('__key__')!r} lacks {name}, which its manifest says it stores")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        raise ManifestError(f"sample {sample.get('__key__')!r}: unreadable {name} ({e})") from None
    ok = arr.dtype == np.float16 and arr.ndim == len(shape)
    ok = ok and all(want is None or got == want for got, want in zip(arr.shape, shape, strict=True))
    if not ok or not np.isfinite(arr).all():
        raise ManifestError(f"sample {sample.get('__key__')!r}: {name} has {arr.dtype} {arr.shape}, expected {shape}")
    return torch.from_numpy(arr.astype(np.float32))


def _decode(sample: dict, size: int, default_label: int, manifest: Manifest) -> Sample:
    img_bytes = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
    if img_bytes is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks an image or a caption")
    with Image.open(io.BytesIO(img_bytes)) as img:
        x = pil_to_tensor(img, size)
    label = default_label
    if "json" in sample:
        label = int(json.loads(sample["json"]).get("cluster", default_label))
    out = Sample(x, sample["txt"].decode("utf-8"), label)
    if manifest.latents is not None:
        out.latent = _array(sample, "latent.npy", (2, *manifest.latents["shape"]))
    if manifest.text_states is not None:
        txt = manifest.text_states
        out.states = _array(sample, "states.npy", (None, txt["dim"]))
        if not 0 < len(out.states) <= txt["tokens"]:
            n, most = len(out.states), txt["tokens"]
            raise ManifestError(f"sample {sample.get('__key__')!r}: {n} text tokens, expected 1 to {most}")
    return out


@dataclass
class RawBatch:
    """A batch's samples as read from the shards, not yet decoded, and the position after it."""

    samples: list[tuple[dict, int]]  # (webdataset sample, its cluster)
    position: DataPosition
    manifest: Manifest
    image_size: int

    def decode(self, part: tuple[int, int] = (0, 1)) -> Batch:
        """Decode the batch, or with ``part=(rank, world)`` only that rank's equal slice of it."""
        tokens = self.manifest.text_states["tokens"] if self.manifest.text_states else 0
        rank, world = part
        rows = self.samples
        if world > 1:
            if len(rows) % world:
                raise ValueError(f"a batch of {len(rows)} samples does not split into {world} equal parts")
            size = len(rows) // world
            rows = rows[rank * size : (rank + 1) * size]
        decoded = [_decode(s, self.image_size, c, self.manifest) for s, c in rows]
        batch = collate(decoded, self.position, tokens)
        if world > 1:
            batch.offset, batch.total = rank * len(rows), len(self.samples)
        return batch


def _cluster_samples(
    manifest: Manifest,
    cluster: int,
    image_size: int,
    seed: int,
    start: DataPosition,
    holdout: bool,
    epochs: int,
    shuffle_buffer: int,
) -> Iterator[tuple[tuple[dict, int], DataPosition]]:
    """Raw samples of one cluster (with their cluster) and the position after each; endless unless
    ``epochs``. Decoding is left to whoever assembles the batch (possibly a loader worker)."""
    entries = manifest.clusters[cluster].holdout if holdout else manifest.clusters[cluster].shards
    urls_all = sorted(manifest.resolve(s.url) for s in entries)
    pos = DataPosition(start.epoch, start.index)
    while not epochs or pos.epoch < epochs:
        rng = random.Random((seed * 100_003 + pos.epoch) * 31 + cluster)
        urls = list(urls_all)
        rng.shuffle(urls)
        n_in_epoch = 0
        for i, sample in enumerate(_samples(urls, rng, 0 if holdout else shuffle_buffer)):
            n_in_epoch += 1
            if i < pos.index:
                continue  # resuming: skip what was already consumed in this epoch
            pos = DataPosition(pos.epoch, i + 1)
            yield (sample, cluster), pos
        if n_in_epoch == 0:
            raise ManifestError(f"shards of cluster {cluster} hold no samples")
        pos = DataPosition(pos.epoch + 1, 0)


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
    decode: bool = True,
) -> Iterator[Batch | RawBatch]:
    """Endless (or ``epochs``-long) batches over the shards of ``clusters``; with ``decode=False``
    they come as :class:`RawBatch` and a loader worker decodes them (``training.loader``).

    Several clusters are interleaved sample by sample, each drawn with probability proportional
    to its size: reading shards one after another would give batches of a single cluster, and a
    router trained on those chases whichever shard is current. With ``epochs`` (evaluation) the
    clusters are simply read in turn. A sample's label is the cluster it was assigned to.
    """
    entries = [s for c in clusters for s in (manifest.clusters[c].holdout if holdout else manifest.clusters[c].shards)]
    if not entries:
        raise ManifestError(f"no {'held-out' if holdout else 'training'} shards for clusters {clusters}")
    verify_local_shards(manifest, entries)
    start = start or DataPosition()
    # A small cluster may have no held-out shard; it simply contributes nothing to a held-out stream.
    clusters = [c for c in clusters if (manifest.clusters[c].holdout if holdout else manifest.clusters[c].shards)]

    def sub(c: int) -> Iterator[tuple[tuple[dict, int], DataPosition]]:
        p = start.mix.get(str(c), [0, 0]) if len(clusters) > 1 else [start.epoch, start.index]
        return _cluster_samples(manifest, c, image_size, seed, DataPosition(*p), holdout, epochs, shuffle_buffer)

    got: list[tuple[dict, int]] = []
    pos = start

    def emit() -> Batch | RawBatch:
        raw = RawBatch(got, pos, manifest, image_size)
        return raw.decode() if decode else raw

    if len(clusters) == 1 or epochs:
        for c in clusters:
            for sample, where in sub(c):
                got.append(sample)
                pos = where
                if len(got) == batch_size:
                    yield emit()
                    got = []
    else:
        streams = {c: sub(c) for c in clusters}
        weights = [manifest.clusters[c].samples for c in clusters]
        mix = {k: list(v) for k, v in start.mix.items()}
        drawn = start.drawn
        while True:
            # Each draw is a function of (seed, draw number), so a resumed mix continues exactly.
            c = random.Random((seed + 1) * 1_000_003 + drawn).choices(clusters, weights)[0]
            sample, where = next(streams[c])
            got.append(sample)
            mix[str(c)] = [where.epoch, where.index]
            drawn += 1
            if len(got) == batch_size:
                pos = DataPosition(mix={k: list(v) for k, v in mix.items()}, drawn=drawn)
                yield emit()
                got = []
    if got:
        yield emit()

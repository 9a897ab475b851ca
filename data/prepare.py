"""``--role prepare``: embed a dataset, cluster it into K semantic clusters, write per-cluster
webdataset shards (img2dataset layout), a held-out split, ``manifest.json`` and a contact sheet.

What is clustered: image features by default (the FID Inception network's pool features, or any
image encoder on disk), as the reference work clusters on image features, so that the router,
which sees only the noisy image, is asked for clusters that pixels can tell apart; captions as an
option. How: :mod:`data.clustering` (two-level k-means, then clusters capped at 1.2x the mean).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.progress import Progress

from data.clustering import DEFAULT_BALANCE, capacity, cluster_embeddings
from data.fonts import label_font
from data.manifest import ClusterEntry, Manifest, ShardEntry, sha256_file
from data.sources import TWEMOJI_CREDIT, Item, SourceError, open_source
from experts.image_encoder import cache_dir, image_embeddings
from experts.latent_space import VaeSpace, pil_to_tensor, tensor_to_pil
from experts.presets import get_preset
from experts.text_encoder import TextEncoderConfig, load_text_encoder


@dataclass
class PrepareConfig:
    source: str = "twemoji"  # "twemoji" (no skin-tone variants), "twemoji:all", "folder:PATH", .tar shards
    out_dir: str = "runs/default/data"
    clusters: int = 4  # K experts
    preset: str = "tiny16"  # expert preset for every cluster (fixes the image size)
    objective: str = "fm"  # "fm", "ddpm", or "mixed" (alternating, HDDM-style)
    image_size: int = 0  # 0: the preset's image size
    holdout_fraction: float = 0.05  # per cluster, kept out of training for evaluation
    fine_clusters: int = 0  # 0: max(8K, 32), capped by the data size
    embed: str = "image"  # "image" (Inception), "image:PATH@ARCH" (open_clip / DINOv2 weights), "caption"
    balance: float = DEFAULT_BALANCE  # cap on a cluster's size, x the mean (0: no cap)
    text_encoder: str = "minilm"
    vae: str = ""  # AutoencoderKL folder: latent presets store every image's latents in the shards
    store_text_states: bool = True  # store each caption's token states in the shards (computed once)
    limit: int = 0  # use at most this many items (0: all)
    shard_size: int = 1000  # samples per shard
    seed: int = 0


def _validate(cfg: PrepareConfig) -> None:
    if cfg.clusters < 2:
        raise ValueError(f"--clusters must be at least 2, got {cfg.clusters}")
    if cfg.objective not in ("fm", "ddpm", "mixed"):
        raise ValueError(f"--objective must be fm, ddpm or mixed, got {cfg.objective!r}")
    if not 0 <= cfg.holdout_fraction < 0.5:
        raise ValueError(f"--holdout-fraction must be in [0, 0.5), got {cfg.holdout_fraction}")
    get_preset(cfg.preset)
    capacity(100, cfg.clusters, cfg.balance)  # checks --balance
    if cfg.embed not in ("caption", "image") and not cfg.embed.startswith("image:"):
        raise ValueError(f"--embed must be image, image:PATH@ARCH or caption, got {cfg.embed!r}")
    weights = cfg.embed.partition(":")[2].partition("@")[0]
    if weights not in ("", "inception") and not Path(weights).is_file():  # before any data is read
        raise ValueError(f"image encoder weights not found at {weights!r}")


def is_holdout(key: str, fraction: float) -> bool:
    """Deterministic split by key hash, so the same item is held out in every re-run."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_shards(
    folder: Path,
    prefix: str,
    items: list[tuple[Item, bytes]],
    cluster: int,
    shard_size: int,
    root: Path,
    extra: dict[str, dict[str, bytes]],
) -> list[ShardEntry]:
    """Shards in the img2dataset layout, plus per key what ``extra`` stores (``latent.npy``, ``states.npy``)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start : start + shard_size]
        path = folder / f"{prefix}-{s:05d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:  # fixed mtime: same data → same hash
            for item, png in chunk:
                meta = {"caption": item.caption, "cluster": cluster, "key": item.key, **item.meta}
                record = {"__key__": item.key, "png": png, "txt": item.caption, "json": json.dumps(meta)}
                sink.write(record | extra.get(item.key, {}))
        entries.append(ShardEntry(str(path.relative_to(root)), sha256_file(path), len(chunk)))
    return entries


def contact_sheet(
    manifest: Manifest, images: dict[int, list[tuple[Image.Image, str]]], path: Path, per_row: int = 12, cell: int = 64
) -> None:
    """One row per cluster: a sample of its images and the first example captions."""
    label_h = 30
    k = manifest.num_clusters
    sheet = Image.new("RGB", (per_row * cell, k * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for c in range(k):
        y = c * (cell + label_h)
        ex = ", ".join(manifest.clusters[c].examples[:4])
        draw.text((4, y + 2), f"cluster {c}  ({manifest.clusters[c].samples} images)", fill="black", font=label_font())
        draw.text((4, y + 15), ex[: per_row * cell // 6], fill=(90, 90, 90), font=label_font())
        for i, (im, _) in enumerate(images[c][:per_row]):
            sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (i * cell, y + label_h))
    sheet.save(path)


def _latent_space(cfg: PrepareConfig, preset) -> VaeSpace | None:
    """The VAE of a latent preset (one clear error when it is missing or unusable); None in pixel space."""
    if preset.space != "latent":
        if cfg.vae:
            raise ValueError(f"preset {preset.name} works in pixel space; --vae is for latent presets (B/2, XL/2)")
        return None
    if not cfg.vae:
        raise ValueError(f"preset {preset.name} works on latents: pass --vae PATH to an AutoencoderKL folder")
    space = VaeSpace(cfg.vae)
    return space.to("cuda" if torch.cuda.is_available() else "cpu")


def _store_latents(space: VaeSpace, items: list[tuple[Item, bytes]], size: int, extra: dict) -> dict:
    """Encode every image once; training then reads latents and never runs the VAE."""
    shape = None
    with Progress(transient=True) as progress:
        task = progress.add_task("encoding latents", total=len(items))
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            images = torch.stack([pil_to_tensor(it.image, size) for it, _ in chunk])
            params = space.posterior(images).to(torch.float16).numpy()  # (B, 2, C, h, w)
            shape = list(params.shape[2:])
            for (it, _), p in zip(chunk, params, strict=True):
                extra[it.key]["latent.npy"] = _npy(p)
            progress.advance(task, len(chunk))
    return {"vae": space.name, "scale": space.scale, "shape": shape}


def _store_text_states(encoder, items: list[tuple[Item, bytes]], extra: dict) -> dict:
    """Encode every caption once; only its real tokens are stored (the rest is masked padding)."""
    captions = [it.caption for it, _ in items]
    tokens = 0
    for i in range(0, len(captions), 256):
        states, mask = encoder.encode(captions[i : i + 256], cache=False)  # each caption once anyway
        tokens = states.shape[1]
        for (it, _), st, m in zip(items[i : i + 256], states, mask, strict=True):
            extra[it.key]["states.npy"] = _npy(st[: max(int(m.sum()), 1)].to(torch.float16).numpy())
    return {"encoder": encoder.name, "tokens": tokens, "dim": encoder.dim}


def prepare(cfg: PrepareConfig) -> tuple[Manifest, str]:
    """Run the whole preparation; returns the manifest and its sha256."""
    _validate(cfg)
    preset = get_preset(cfg.preset)
    size = cfg.image_size or preset.image_size
    space = _latent_space(cfg, preset)  # before reading any data: a bad --vae fails at once
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)

    items: list[tuple[Item, bytes]] = []
    thumbs: list[Image.Image] = []
    originals: list[Image.Image] = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"reading {cfg.source}", total=cfg.limit or None)
        for item in open_source(cfg.source, cfg.limit):
            img = tensor_to_pil(pil_to_tensor(item.image, size))  # composited on white, resized
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            if cfg.embed != "caption":
                originals.append(item.image.copy())  # the source image, before it is resized
            item.image = img
            items.append((item, buf.getvalue()))
            thumbs.append(img)
            progress.advance(task)
    if not items:
        raise SourceError(f"source {cfg.source!r} yielded no image with a caption")

    encoder_cfg = TextEncoderConfig.parse(cfg.text_encoder)
    captions = [it.caption for it, _ in items]
    encoder = load_text_encoder(encoder_cfg) if cfg.embed == "caption" or cfg.store_text_states else None
    if cfg.embed == "caption":
        emb = encoder.sentence_embeddings(captions).numpy()
        embedding_name = f"caption:{encoder_cfg.name}"
    else:
        with Progress(transient=True) as progress:
            task = progress.add_task("embedding images", total=len(originals))
            spec = cfg.embed.partition(":")[2]
            emb, embedding_name = image_embeddings(
                spec, originals, lambda n: progress.advance(task, n), cache=cache_dir()
            )
        originals.clear()

    labels, centroids = cluster_embeddings(
        emb.astype(np.float64), cfg.clusters, cfg.fine_clusters, cfg.seed, cfg.balance
    )
    extra: dict[str, dict[str, bytes]] = {it.key: {} for it, _ in items}
    latents_info = _store_latents(space, items, size, extra) if space is not None else None
    text_info = _store_text_states(encoder, items, extra) if cfg.store_text_states else None

    clusters: list[ClusterEntry] = []
    samples: dict[int, list[tuple[Image.Image, str]]] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("writing shards", total=cfg.clusters)
        for c in range(cfg.clusters):
            idx = np.flatnonzero(labels == c)
            members = [items[i] for i in idx]
            train = [m for m in members if not is_holdout(m[0].key, cfg.holdout_fraction)]
            held = [m for m in members if is_holdout(m[0].key, cfg.holdout_fraction)]
            if not train:
                raise ValueError(f"cluster {c} has no training items; use more data or fewer clusters")
            folder = out / f"cluster_{c}"
            objective = "ddpm" if cfg.objective == "ddpm" or (cfg.objective == "mixed" and c % 2 == 1) else "fm"
            # Examples: the captions nearest the centroid describe the cluster best.
            dist = ((emb[idx] - centroids[c]) ** 2).sum(1)
            examples = list(dict.fromkeys(captions[i] for i in idx[np.argsort(dist)]))[:8]
            clusters.append(
                ClusterEntry(
                    id=c,
                    samples=len(train),
                    shards=_write_shards(folder, "train", train, c, cfg.shard_size, out, extra),
                    holdout=_write_shards(folder, "holdout", held, c, cfg.shard_size, out, extra) if held else [],
                    centroid=[round(float(v), 5) for v in centroids[c]],
                    examples=examples,
                    objective=objective,
                    preset=cfg.preset,
                )
            )
            pick = rng.choice(idx, size=min(12, len(idx)), replace=False)
            samples[c] = [(thumbs[i], captions[i]) for i in pick]
            progress.advance(task)

    manifest = Manifest(
        source=cfg.source,
        image_size=size,
        text_encoder=encoder_cfg.name,
        embedding=embedding_name,
        holdout_fraction=cfg.holdout_fraction,
        clusters=clusters,
        credit=TWEMOJI_CREDIT if cfg.source.startswith("twemoji") else "",
        latents=latents_info,
        text_states=text_info,
    )
    digest = manifest.save(out)
    contact_sheet(manifest, samples, out / "clusters.png")
    return manifest, digest


def prepare_and_report(cfg: PrepareConfig) -> str:
    """``--role prepare``: prepare, then say what is in each cluster and where the run is; returns its sha256."""
    t0 = time.time()
    manifest, digest = prepare(cfg)
    print(
        f"prepared {sum(c.samples for c in manifest.clusters)} training images in {manifest.num_clusters} clusters "
        f"({time.time() - t0:.0f}s); run {digest[:12]}"
    )
    for c in manifest.clusters:
        print(f"  cluster {c.id}: {c.samples:5d} images, {c.objective}, e.g. {', '.join(c.examples[:3])}")
    out = Path(cfg.out_dir)
    print(f"manifest: {out / 'manifest.json'}\ncontact sheet: {out / 'clusters.png'}", flush=True)
    return digest

"""Router training (``--job router``): cross-entropy of r(x_t, t) against each sample's cluster.

x_t comes from the same FM forward process the sampler walks (x_t = (1 − t) x0 + t ε), so the
router learns p(cluster | x_t) along the path it will be asked about. Held-out accuracy is
reported per noise level: near t = 1 nothing can be told apart (chance), near t = 0 it should
be high. A router that reads text (``*-text`` presets) also gets each caption's pooled token
states; near t = 1 it has the caption alone to go by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from data.manifest import Manifest
from data.streaming import Batch, DataPosition, RawBatch, stream_batches
from experts.objectives import TIMESTEP_SCALE, fm_interpolate
from experts.presets import get_preset
from experts.text_encoder import TextEncoder
from router.network import RouterNet, build_router, get_router_preset, pool_text
from router.presets import DEFAULT_ROUTER_PRESET
from training.captions import CaptionStates
from training.expert_job import clean_x0
from training.loop import TrainConfig

NOISE_BINS = (0.1, 0.3, 0.5, 0.7, 0.9)


class RouterJob:
    def __init__(
        self,
        manifest: Manifest,
        manifest_sha256: str,
        space_name: str,
        encode_space,
        cfg: TrainConfig,
        preset: str = DEFAULT_ROUTER_PRESET,
        encoder: TextEncoder | None = None,
    ) -> None:
        self.manifest, self.manifest_sha256 = manifest, manifest_sha256
        self.expert_preset = get_preset(manifest.clusters[0].preset)
        self.preset = get_router_preset(preset)
        if self.preset.text and encoder is None:
            raise ValueError(f"router preset {preset!r} reads the prompt: it needs the experts' text encoder")
        self.encoder = encoder if self.preset.text else None
        self.captions = CaptionStates(encoder, manifest) if self.encoder is not None else None
        self.space_name, self.encode_space = space_name, encode_space
        self.name = "router"
        self.model: RouterNet = build_router(
            self.preset,
            manifest.num_clusters,
            self.expert_preset.channels,
            self.expert_preset.sample_size,
            text_dim=self.encoder.dim if self.encoder is not None else 0,
        )
        self.batch_size = cfg.batch_size or self.preset.batch_size
        self.lr = cfg.lr or self.preset.lr
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps >= 0 else self.preset.warmup_steps
        self.seed = cfg.seed
        self.last_accuracy: dict[str, float] = {}

    def batches(self, start: DataPosition, decode: bool = True) -> Iterator[Batch | RawBatch]:
        clusters = list(range(self.manifest.num_clusters))
        size = self.expert_preset.image_size
        return stream_batches(self.manifest, clusters, self.batch_size, size, self.seed, start, decode=decode)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x0 = clean_x0(batch, self.manifest, self.encode_space, generator)
        # uniform: the router is asked at every step; drawn for an island's whole batch (batch.draw)
        t = batch.draw(lambda n: torch.rand(n, generator=generator)).to(x0.device)
        noise = batch.draw(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator)).to(x0.device)
        x_t = fm_interpolate(x0, noise, t)
        text = None
        if self.captions is not None:  # drawn only here, so the Paris router's random numbers are as they were
            drop = batch.draw(lambda n: torch.rand(n, generator=generator)) < self.preset.text_dropout
            text = self.text(batch, drop)
        logits = self.model(x_t, TIMESTEP_SCALE * t, text)
        return torch.nn.functional.cross_entropy(logits, batch.labels)

    def text(self, batch: Batch, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """The captions' pooled embeddings (B, D) for a router that reads text (the ``drop`` rows
        the empty prompt's), else None."""
        return None if self.captions is None else pool_text(*self.captions(batch, drop))

    def evaluate(self) -> None:
        """Called by the loop on the EMA weights just before each checkpoint."""
        self.last_accuracy = router_accuracy(
            self.model, self.manifest, self.encode_space, self.expert_preset.image_size, self.seed, self.text
        )

    def meta(self) -> dict:
        return {
            "kind": "router",
            "num_experts": self.manifest.num_clusters,
            "router_preset": self.preset.to_dict(),
            "space": self.space_name,
            "text_encoder": None if self.encoder is None else self.encoder.name,
            "manifest_sha256": self.manifest_sha256,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "heldout_accuracy": self.last_accuracy,
        }


@torch.no_grad()
def router_accuracy(
    model: RouterNet,
    manifest: Manifest,
    encode_space,
    image_size: int,
    seed: int = 0,
    text: Callable[[Batch], torch.Tensor | None] | None = None,
    max_samples: int = 2000,
) -> dict[str, float]:
    """Held-out top-1 accuracy at each noise level of ``NOISE_BINS`` (training shards if none are held
    out). ``text``: a batch's pooled caption embeddings, for a router that reads the prompt."""
    clusters = list(range(manifest.num_clusters))
    holdout = any(c.holdout for c in manifest.clusters)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = {t: 0 for t in NOISE_BINS}
    n = 0
    device = next(model.parameters()).device
    for batch in stream_batches(manifest, clusters, 256, image_size, seed, holdout=holdout, epochs=1, shuffle_buffer=0):
        batch = batch.to(device)
        if batch.latents is not None and manifest.latents is not None:  # the posterior mean: no noise to add
            x0 = batch.latents[:, 0] * manifest.latents["scale"]
        else:
            x0 = encode_space(batch.images)
        pooled = text(batch) if text is not None else None
        for t in NOISE_BINS:
            tt = torch.full((len(x0),), t, device=device)
            x_t = fm_interpolate(x0, torch.randn(x0.shape, generator=gen).to(device), tt)
            correct[t] += (model(x_t, TIMESTEP_SCALE * tt, pooled).argmax(-1) == batch.labels).sum().item()
        n += len(x0)
        if n >= max_samples:
            break
    model.train()
    return {f"t={t}": round(correct[t] / max(n, 1), 4) for t in NOISE_BINS} | {
        "samples": n,
        "split": "holdout" if holdout else "train",
    }

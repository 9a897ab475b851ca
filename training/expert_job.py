"""The expert job: one expert trained on its own cluster's shards with the cluster's objective.

The loss is the objective's regression target (FM velocity or DDPM noise) on the cluster's images,
with ~10 % of captions dropped to "" so the expert can be guided at sampling time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from data.manifest import Manifest
from data.streaming import Batch, DataPosition, RawBatch, stream_batches
from experts.latent_space import sample_posterior
from experts.objectives import make_training_batch, sample_train_times
from experts.presets import ExpertPreset, build_expert, expert_forward, get_preset
from experts.text_encoder import TextEncoder
from training.captions import CaptionStates
from training.loop import TrainConfig


def clean_x0(batch: Batch, manifest: Manifest, encode_space, generator: torch.Generator) -> torch.Tensor:
    """The batch in the experts' space: stored latents sampled from their posterior when the shards
    hold them (the VAE never runs while training), else ``encode_space`` of the images."""
    if batch.latents is not None and manifest.latents is not None:
        shape = batch.latents.shape[2:]
        eps = batch.draw(lambda n: torch.randn((n, *shape), generator=generator))
        return sample_posterior(batch.latents, manifest.latents["scale"], eps=eps)
    return encode_space(batch.images)


class Draw(NamedTuple):
    """What one training step draws: clean samples, noise, times, and the captions' text states."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor


class ExpertJob:
    """Train expert ``cluster`` on its cluster's shards with the cluster's objective."""

    def __init__(
        self,
        manifest: Manifest,
        manifest_sha256: str,
        cluster: int,
        encoder: TextEncoder,
        space_name: str,
        encode_space,
        cfg: TrainConfig,
        preset: ExpertPreset | None = None,
    ) -> None:
        if not 0 <= cluster < manifest.num_clusters:
            raise ValueError(f"unknown expert {cluster}; this run has experts 0..{manifest.num_clusters - 1}")
        entry = manifest.clusters[cluster]
        self.manifest, self.manifest_sha256, self.cluster = manifest, manifest_sha256, cluster
        self.preset = preset or get_preset(entry.preset)
        self.objective = entry.objective
        self.encoder, self.space_name, self.encode_space = encoder, space_name, encode_space
        self.name = f"expert {cluster} ({self.objective})"
        self.model = build_expert(self.preset, encoder.dim)
        self.batch_size = cfg.batch_size or self.preset.batch_size
        self.lr = cfg.lr or self.preset.lr
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps >= 0 else self.preset.warmup_steps
        self.cond_dropout = cfg.cond_dropout
        self.seed = cfg.seed
        self.captions = CaptionStates(encoder, manifest)

    def batches(self, start: DataPosition, decode: bool = True) -> Iterator[Batch | RawBatch]:
        clusters = [self.cluster]
        return stream_batches(
            self.manifest, clusters, self.batch_size, self.preset.image_size, self.seed, start, decode=decode
        )

    def text(self, batch: Batch, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and mask of the batch's captions, with the ``drop`` rows made the empty prompt."""
        return self.captions(batch, drop)

    def draw(self, batch: Batch, generator: torch.Generator) -> Draw:
        """A training step's inputs, drawn in one fixed order (a run is reproducible, and every job
        built on this one draws alike): which captions drop, x0, their text states, noise, times."""
        # Every random number is drawn for the island's whole global batch (batch.draw), so a
        # job split over N processes trains on the numbers one process would draw.
        drop = batch.draw(lambda n: torch.rand(n, generator=generator)) < self.cond_dropout
        x0 = clean_x0(batch, self.manifest, self.encode_space, generator)
        device = x0.device
        states, mask = self.text(batch, drop)
        # Noise and times come from the CPU generator, so a run is the same on any device.
        noise = batch.draw(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator)).to(device)
        t = batch.draw(lambda n: sample_train_times(n, generator)).to(device)
        return Draw(x0, noise, t, states, mask)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x0, noise, t, states, mask = self.draw(batch, generator)
        tb = make_training_batch(self.objective, x0, noise, t)
        pred = expert_forward(self.model, tb.x_in, tb.timestep, states, mask)
        return torch.nn.functional.mse_loss(pred, tb.target)

    def meta(self) -> dict:
        return {
            "kind": "expert",
            "cluster": self.cluster,
            "objective": self.objective,
            "preset": self.preset.to_dict(),
            "text_encoder": self.encoder.name,
            "space": self.space_name,
            "manifest_sha256": self.manifest_sha256,
            "batch_size": self.batch_size,
            "lr": self.lr,
        }

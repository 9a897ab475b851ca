"""The expert job: one expert trained on its own cluster's shards with the cluster's objective.

The loss is the objective's regression target (FM velocity or DDPM noise) on the cluster's images,
with ~10 % of captions dropped to "" so the expert can be guided at sampling time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data.manifest import Manifest
from data.streaming import Batch, DataPosition, stream_batches
from experts.objectives import make_training_batch, sample_train_times
from experts.presets import ExpertPreset, build_expert, expert_forward, get_preset
from experts.text_encoder import TextEncoder
from training.loop import TrainConfig


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

    def batches(self, start: DataPosition) -> Iterator[Batch]:
        return stream_batches(self.manifest, [self.cluster], self.batch_size, self.preset.image_size, self.seed, start)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        drop = torch.rand(len(batch.captions), generator=generator) < self.cond_dropout
        captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=False)]
        x0 = self.encode_space(batch.images)
        device = x0.device
        states, mask = (a.to(device) for a in self.encoder.encode(captions))
        # Noise and times come from the CPU generator, so a run is the same on any device.
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = sample_train_times(len(x0), generator).to(device)
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

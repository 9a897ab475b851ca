"""A batch's caption token states, the same way for every job that reads text: the shards' stored
states when they come from this encoder (the encoder never runs while training), else the encoder."""

from __future__ import annotations

import torch

from data.manifest import Manifest
from data.streaming import Batch
from experts.text_encoder import TextEncoder


class CaptionStates:
    """``(states (B, L, D), mask (B, L))`` of a batch's captions, with chosen rows made the empty prompt."""

    def __init__(self, encoder: TextEncoder, manifest: Manifest) -> None:
        self.encoder = encoder
        # A dropped caption gets the empty prompt's states, encoded once here.
        empty_states, empty_mask = encoder.encode([""])
        stored = manifest.text_states
        self.stored = bool(stored and stored["encoder"] == encoder.name and stored["tokens"] == empty_states.shape[1])
        self.empty = (empty_states[0], empty_mask[0])

    def __call__(self, batch: Batch, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch.images.device
        if drop is None:
            drop = torch.zeros(len(batch.captions), dtype=torch.bool)
        if self.stored and batch.states is not None:
            keep = ~drop.to(device)
            states = torch.where(keep[:, None, None], batch.states, self.empty[0].to(device))
            mask = torch.where(keep[:, None], batch.mask, self.empty[1].to(device))
            return states, mask
        captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]
        return tuple(a.to(device) for a in self.encoder.encode(captions))

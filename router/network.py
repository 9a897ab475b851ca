"""The router r(x_t, t) → K logits: a small DiT-style classifier (text is not an input, as in Paris).

Patchify → learned position embeddings → transformer blocks modulated by the timestep through
adaLN → mean-pool → linear head. ``B/2`` is the Paris router shape (~129M parameters).
Saved and loaded with diffusers' ``ModelMixin`` (safetensors, config.json).

The ``*-text`` presets (``text_dim > 0``) also read the prompt: its pooled text embedding is added
to the time embedding that modulates every block. For a text-to-image model the posterior the
ensemble needs is p(k | x_t, prompt); near t = 1 x_t says nothing about the cluster and the
prompt says nearly everything, so a router without the text must guess the first, decisive steps.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from router.presets import ROUTER_PRESETS, RouterPreset


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted/scaled/gated by the time embedding."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-Zero: each block starts as identity
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        )  # (B, 1, D) each
        h = self.norm1(x) * (1 + scale1) + shift1  # (B, N, D)
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)  # (B, N, D)


class RouterNet(ModelMixin, ConfigMixin):
    """Predicts which cluster the clean image behind x_t belongs to."""

    @register_to_config
    def __init__(
        self,
        num_experts: int = 4,
        in_channels: int = 3,
        sample_size: int = 32,
        hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        patch: int = 4,
        text_dim: int = 0,
    ) -> None:
        super().__init__()
        if sample_size % patch:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch {patch}")
        tokens = (sample_size // patch) ** 2
        self.patchify = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, hidden) * 0.02)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden)
        # The prompt enters like the timestep: one vector that modulates every block.
        self.text_embed = TimestepEmbedding(text_dim, hidden) if text_dim else None
        self.blocks = nn.ModuleList(AdaLNBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, num_experts)

    @property
    def reads_text(self) -> bool:
        return self.text_embed is not None

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``text``: the prompt's pooled embedding (B, text_dim) from :func:`pool_text`; ignored by a
        router that does not read text, required by one that does."""
        h = self.patchify(x_t).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.time_embed(self.time_proj(timestep.reshape(-1)).to(h.dtype))  # (B, D)
        if self.text_embed is not None:
            if text is None:
                raise ValueError("this router reads the prompt: pass its pooled text embedding")
            c = c + self.text_embed(text.to(h.dtype))
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        return self.head(self.norm(h.mean(dim=1)))  # (B, K)


def pool_text(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of a prompt's real token states: (B, L, D), (B, L) → (B, D)."""
    m = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


def build_router(
    preset: RouterPreset, num_experts: int, channels: int, sample_size: int, text_dim: int = 0
) -> RouterNet:
    """``text_dim``: the text encoder's width, used when the preset reads text."""
    if preset.text and text_dim < 1:
        raise ValueError(f"router preset {preset.name!r} reads the prompt: give the text encoder's width")
    return RouterNet(
        num_experts=num_experts,
        in_channels=channels,
        sample_size=sample_size,
        hidden=preset.hidden,
        layers=preset.layers,
        heads=preset.heads,
        patch=preset.patch,
        text_dim=text_dim if preset.text else 0,
    )


def get_router_preset(name: str) -> RouterPreset:
    try:
        return ROUTER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown router preset {name!r}; choose one of {sorted(ROUTER_PRESETS)}") from None

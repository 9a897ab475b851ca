"""Expert network presets over diffusers' ``PixArtTransformer2DModel`` (AdaLN-Single + cross-attention).

``tiny`` and ``small`` are sized for a 2-core CPU in pixel space; ``B/2`` and ``XL/2`` are the
DiT shapes of the reference work (XL/2 is the Paris expert: 605M parameters on 32x32x4 latents).
The CLI's ``--preset choices=`` reads this table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line reads the table without importing torch and diffusers
    import torch
    from diffusers import PixArtTransformer2DModel


@dataclass(frozen=True)
class ExpertPreset:
    """Shape of one expert network and of the space it denoises in."""

    name: str
    space: str  # "pixel" (RGB in [-1, 1]) or "latent" (needs an AutoencoderKL on disk)
    sample_size: int  # side of the denoised tensor (pixels or latent cells)
    channels: int  # 3 for RGB, 4 for sd-vae latents
    hidden: int  # transformer width
    layers: int
    heads: int
    patch: int
    batch_size: int  # a sensible per-step batch on the hardware the preset is meant for
    lr: float  # AdamW learning rate that works for this width
    warmup_steps: int = 0  # linear LR warm-up (the GPU presets' large batches and widths want one)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def image_size(self) -> int:
        """Side of the RGB image the preset produces (latents are 8x downsampled)."""
        return self.sample_size * (8 if self.space == "latent" else 1)

    def to_dict(self) -> dict:
        return asdict(self)


EXPERT_PRESETS: dict[str, ExpertPreset] = {
    p.name: p
    for p in (
        ExpertPreset("tiny", "pixel", 32, 3, 128, 6, 4, 4, batch_size=64, lr=1e-3),
        # Batch 8: on the CPU a step is the scarce thing, not samples. At the demo's 16,000 samples per
        # expert, batch 8 x 2,000 steps gives top-1 FID 113 where batch 64 x 250 gave 152 (README).
        ExpertPreset("tiny16", "pixel", 16, 3, 128, 6, 4, 2, batch_size=8, lr=1e-3),
        ExpertPreset("small", "pixel", 32, 3, 192, 8, 6, 2, batch_size=32, lr=5e-4),
        ExpertPreset("B/2", "latent", 32, 4, 768, 12, 12, 2, batch_size=64, lr=1e-4, warmup_steps=500),
        ExpertPreset("XL/2", "latent", 32, 4, 1152, 28, 16, 2, batch_size=32, lr=1e-4, warmup_steps=1000),
    )
}


def get_preset(name: str) -> ExpertPreset:
    """Look a preset up by name, with a one-line error listing the known ones."""
    try:
        return EXPERT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(EXPERT_PRESETS)}") from None


def student_preset(name: str, experts: ExpertPreset) -> ExpertPreset:
    """The distilled student's preset ``name``, checked against the experts' own: it learns their
    velocity on their x_t, so it must work on samples of the same space and shape."""
    student = get_preset(name)
    if (student.space, student.channels, student.sample_size) != (experts.space, experts.channels, experts.sample_size):
        raise ValueError(
            f"the student's preset {student.name} works on {student.channels}x{student.sample_size}² "
            f"{student.space} samples, the experts' {experts.name} on {experts.channels}x{experts.sample_size}² "
            f"{experts.space} ones: pick a preset of the experts' sample shape"
        )
    return student


def build_expert(preset: ExpertPreset, text_dim: int) -> PixArtTransformer2DModel:
    """A freshly initialised expert: predicts a tensor of the input's shape (v or ε)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=preset.heads,
        attention_head_dim=preset.head_dim,
        in_channels=preset.channels,
        out_channels=preset.channels,  # no learned variance: FM predicts v, DDPM predicts ε
        num_layers=preset.layers,
        cross_attention_dim=preset.hidden,
        sample_size=preset.sample_size,
        patch_size=preset.patch,
        caption_channels=text_dim,  # text token states are projected to the width inside
        use_additional_conditions=False,  # no resolution/aspect micro-conditioning
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=max(preset.sample_size // 64, 1),
    )


def expert_forward(
    model: PixArtTransformer2DModel,
    x: torch.Tensor,  # (B, C, H, W) network input
    timestep: torch.Tensor,  # (B,) in [0, 1000]
    text_states: torch.Tensor,  # (B, L, D) text token states
    text_mask: torch.Tensor,  # (B, L) 1 = real token
) -> torch.Tensor:
    """One forward pass; returns (B, C, H, W)."""
    return model(
        x,
        encoder_hidden_states=text_states,
        encoder_attention_mask=text_mask,
        timestep=timestep,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

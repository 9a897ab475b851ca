"""Model FLOPs of an expert per training sample, counted from its preset, and MFU.

Counted the way model FLOPs utilisation is usually reported (PaLM appendix B, nanoGPT's
``estimate_mfu``): every matmul of the forward pass costs 2 FLOPs per multiply-accumulate,
including the two attention matmuls (QKᵀ and AV, never halved: attention here is not causal);
norms, activations, softmax, biases and residual adds are left out, and so is any recomputation.
A training step is forward + backward, the backward at twice the forward: 3x the forward FLOPs.

The count follows diffusers' ``PixArtTransformer2DModel`` as ``experts.presets.build_expert``
configures it: patch embedding, caption projection, AdaLN-Single timestep MLP, per block
self-attention, cross-attention onto the text tokens and a GELU-tanh MLP of 4x width, and the
final projection back to patches. ``tests/test_flops.py`` checks it against torch's
``FlopCounterMode`` on the real model.
"""

from __future__ import annotations

from experts.presets import ExpertPreset

TIMESTEP_FREQ_DIM = 256  # sinusoidal timestep features fed to AdaLN-Single's MLP (diffusers' Timesteps)
FF_MULT = 4  # diffusers' FeedForward default: inner width 4x the model width
ADALN_CHUNKS = 6  # AdaLN-Single emits shift/scale/gate for attention and MLP: 6 x width per sample

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name()
# in order: (substring that must occur, substrings that must not, peak). Lower-case.
PEAK_BF16_FLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("h100", ("pcie", "nvl"), 989e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("h200", ("nvl",), 989e12),  # H200 SXM (and GH200)
)


def image_tokens(preset: ExpertPreset) -> int:
    """N: patches of one sample, (sample_size / patch)²."""
    return (preset.sample_size // preset.patch) ** 2


def flops_breakdown(preset: ExpertPreset, text_tokens: int, text_dim: int) -> dict[str, int]:
    """Forward FLOPs of one sample, per part of the network (summed over all blocks)."""
    n, l_txt = image_tokens(preset), text_tokens
    d = preset.heads * preset.head_dim  # the model's inner width (= hidden for every preset)
    patch_dim = preset.patch * preset.patch * preset.channels
    blocks = preset.layers
    return {
        # Conv2d(channels, d, kernel=stride=patch): one (patch² x channels) → d matmul per token.
        "patch_embed": 2 * n * patch_dim * d,
        # Linear(text_dim, d) → GELU-tanh → Linear(d, d) on every text token.
        "caption_projection": 2 * l_txt * (text_dim * d + d * d),
        # Per sample, not per token: Linear(256, d) → SiLU → Linear(d, d), then Linear(d, 6d).
        "timestep_adaln": 2 * (TIMESTEP_FREQ_DIM * d + d * d + d * ADALN_CHUNKS * d),
        # q, k, v and out projections over the N image tokens.
        "self_attn_proj": blocks * 2 * n * 4 * d * d,
        # QKᵀ (N x N x d) and AV (N x N x d).
        "self_attn_scores": blocks * 2 * 2 * n * n * d,
        # q and out over N image tokens; k and v over the L projected text tokens.
        "cross_attn_proj": blocks * 2 * (2 * n * d * d + 2 * l_txt * d * d),
        # QKᵀ (N x L x d) and AV (N x L x d).
        "cross_attn_scores": blocks * 2 * 2 * n * l_txt * d,
        # Linear(d, 4d) → GELU-tanh → Linear(4d, d).
        "mlp": blocks * 2 * n * 2 * d * FF_MULT * d,
        # Linear(d, patch² x channels) back to pixels or latents.
        "proj_out": 2 * n * d * patch_dim,
    }


def forward_flops_per_sample(preset: ExpertPreset, text_tokens: int, text_dim: int) -> int:
    """Model FLOPs of one sample's forward pass (matmuls only, 2 per multiply-accumulate)."""
    return sum(flops_breakdown(preset, text_tokens, text_dim).values())


def train_flops_per_sample(preset: ExpertPreset, text_tokens: int, text_dim: int) -> int:
    """Model FLOPs of one sample's training step: forward + backward (2x forward) = 3x forward."""
    return 3 * forward_flops_per_sample(preset, text_tokens, text_dim)


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of ``peak_flops``."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return samples_per_s * flops_per_sample / peak_flops


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()``; None if unknown."""
    name = device_name.lower()
    for must, must_not, peak in PEAK_BF16_FLOPS:
        if must in name and not any(x in name for x in must_not):
            return peak
    return None

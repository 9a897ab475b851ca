"""The analytic FLOPs count of ``experts/flops.py`` against torch's FlopCounterMode on the real models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from experts.flops import (
    flops_breakdown,
    forward_flops_per_sample,
    image_tokens,
    mfu,
    peak_bf16_flops,
    train_flops_per_sample,
)
from experts.presets import ExpertPreset, build_expert, expert_forward, get_preset

CASES = [
    # (preset, text tokens, text dim): tiny with MiniLM's 16 x 384 states; B/2's latent shape with
    # CLIP's 77 x 768, cut to 2 blocks so it stays fast on a CPU (FLOPs are linear in the blocks).
    pytest.param(get_preset("tiny"), 16, 384, id="tiny-minilm"),
    pytest.param(dataclasses.replace(get_preset("B/2"), layers=2), 77, 768, id="B/2x2-clip"),
]


def measured(preset: ExpertPreset, text_tokens: int, text_dim: int, backward: bool = False) -> FlopCounterMode:
    """FLOPs of the real network on a batch of one, counted by torch."""
    torch.manual_seed(0)
    model = build_expert(preset, text_dim)
    x = torch.randn(1, preset.channels, preset.sample_size, preset.sample_size)
    states, mask = torch.randn(1, text_tokens, text_dim), torch.ones(1, text_tokens)
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as visible bmm ops; the fused CPU kernel is not counted by torch.
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = expert_forward(model, x, torch.tensor([500.0]), states, mask)
        if backward:
            out.square().mean().backward()
    return counter


@pytest.mark.parametrize(("preset", "text_tokens", "text_dim"), CASES)
def test_forward_flops_match_flop_counter(preset: ExpertPreset, text_tokens: int, text_dim: int) -> None:
    counter = measured(preset, text_tokens, text_dim)
    by_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    parts = flops_breakdown(preset, text_tokens, text_dim)
    assert forward_flops_per_sample(preset, text_tokens, text_dim) == pytest.approx(counter.get_total_flops(), rel=0.01)
    # Each kind of op separately, so one error cannot hide behind another.
    assert parts["patch_embed"] == pytest.approx(by_op["convolution"], rel=0.01)
    attention = parts["self_attn_scores"] + parts["cross_attn_scores"]
    assert attention == pytest.approx(by_op.get("bmm", 0) + by_op.get("baddbmm", 0), rel=0.01)
    linears = sum(parts.values()) - parts["patch_embed"] - attention
    assert linears == pytest.approx(by_op.get("addmm", 0) + by_op.get("mm", 0), rel=0.01)


def test_training_step_is_three_forwards() -> None:
    p = get_preset("tiny")
    assert train_flops_per_sample(p, 16, 384) == 3 * forward_flops_per_sample(p, 16, 384)
    # The convention holds for the real network: its backward costs ~2x its forward (a little less,
    # as the input images and text states need no gradient).
    fwd = measured(p, 16, 384).get_total_flops()
    both = measured(p, 16, 384, backward=True).get_total_flops()
    assert 2.9 * fwd < both <= 3.0 * fwd


def test_flops_scale_as_the_formula_says() -> None:
    """Blocks add linearly; text tokens only touch the caption projection and cross-attention."""
    b2 = get_preset("B/2")
    one, two = (forward_flops_per_sample(dataclasses.replace(b2, layers=k), 77, 768) for k in (1, 2))
    assert forward_flops_per_sample(b2, 77, 768) == one + (b2.layers - 1) * (two - one)
    assert image_tokens(b2) == 256 and image_tokens(get_preset("tiny")) == 64
    short, long = flops_breakdown(b2, 16, 768), flops_breakdown(b2, 77, 768)
    changed = {k for k in long if long[k] != short[k]}
    assert changed == {"caption_projection", "cross_attn_proj", "cross_attn_scores"}


@pytest.mark.parametrize(("name", "dit_gmacs"), [("B/2", 23.01), ("XL/2", 118.64)])
def test_self_attention_part_matches_dit(name: str, dit_gmacs: float) -> None:
    """Without the text path the network is a DiT: the DiT paper's Gflops (fvcore multiply-adds) x 2."""
    parts = flops_breakdown(get_preset(name), 77, 768)
    text_path = parts["caption_projection"] + parts["cross_attn_proj"] + parts["cross_attn_scores"]
    assert sum(parts.values()) - text_path == pytest.approx(2 * dit_gmacs * 1e9, rel=0.01)


def test_mfu_arithmetic() -> None:
    assert mfu(100.0, 1e12, 1e15) == pytest.approx(0.1)
    assert mfu(0.0, 1e12, 989e12) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
    # 500 samples/s of B/2 training on an H100: a fraction of the dense bf16 peak.
    b2 = train_flops_per_sample(get_preset("B/2"), 77, 768)
    assert mfu(500.0, b2, 989e12) == pytest.approx(500.0 * b2 / 989e12)


def test_peak_table() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") is None  # a different (lower) peak: not guessed
    assert peak_bf16_flops("Tesla T4") is None

"""Real model classes: presets (Paris shapes), the default text encoder, and the real-scale paths
(open_clip text tower, AutoencoderKL latents) with random weights of the same classes."""

import torch

from experts.latent_space import VaeSpace
from experts.presets import EXPERT_PRESETS, build_expert, count_parameters, expert_forward
from experts.text_encoder import OpenClipEncoder, TextEncoderConfig, load_text_encoder
from router.network import build_router
from router.presets import ROUTER_PRESETS


def test_preset_sizes_match_the_reference_shapes():
    with torch.device("meta"):
        xl = count_parameters(build_expert(EXPERT_PRESETS["XL/2"], 768))
        router = count_parameters(build_router(ROUTER_PRESETS["B/2"], 8, 4, 32))
    assert 590e6 < xl < 620e6  # Paris expert: 605M
    assert 120e6 < router < 140e6  # Paris router: ~129M


def test_tiny_expert_forward_shape():
    p = EXPERT_PRESETS["tiny"]
    model = build_expert(p, 384)
    x = torch.randn(2, p.channels, p.sample_size, p.sample_size)
    out = expert_forward(model, x, torch.tensor([10.0, 900.0]), torch.randn(2, 5, 384), torch.ones(2, 5))
    assert out.shape == x.shape


def test_minilm_token_states_and_embeddings():
    enc = load_text_encoder(TextEncoderConfig())
    states, mask = enc.encode(["red apple", "", "red apple"])
    assert states.shape == (3, 16, 384) and mask.shape == (3, 16)
    assert torch.equal(states[0], states[2]) and mask[1].sum() == 2  # [CLS] [SEP] for the empty prompt
    emb = enc.sentence_embeddings(["red apple", "green apple", "flag: France"])
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]  # semantics, so clusters mean something


def test_open_clip_text_tower_with_random_weights():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    enc = OpenClipEncoder(TextEncoderConfig(kind="clip", clip_arch="ViT-B-32"), model=model)
    states, mask = enc.encode(["a red apple", ""])
    assert states.shape == (2, 77, 512) and enc.dim == 512
    assert mask[0].sum() > mask[1].sum() >= 2


def test_vae_latent_space_with_random_weights(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    space = VaeSpace(str(tmp_path / "vae"))
    z = space.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert z.shape == (1, 4, 8, 8)
    assert space.decode(z).shape == (1, 3, 16, 16)


def test_prepare_with_image_embeddings_from_local_open_clip_weights(tmp_path):
    """``--embed image:PATH@ARCH`` clusters on an open_clip image tower loaded from a local file."""
    import open_clip
    from safetensors.torch import save_file

    from data.manifest import load_manifest
    from data.prepare import PrepareConfig, prepare

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    prepare(PrepareConfig(out_dir=str(tmp_path / "data"), clusters=2, limit=40, embed=f"image:{weights}@ViT-B-32"))
    manifest, _ = load_manifest(tmp_path / "data")
    assert manifest.embedding == "image:ViT-B-32" and manifest.num_clusters == 2

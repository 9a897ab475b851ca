"""The router learns cluster labels from (x_t, t): cross-entropy falls well below log K; a router
that reads the prompt also tells apart clusters the pixels cannot.

The toy sets are real folder sources run through ``prepare``: three caption themes with
matching colours, so the clusters are visible in the pixels; or all in the same grey noise.
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data.checkpoint import CheckpointError
from data.manifest import load_manifest
from data.prepare import PrepareConfig, prepare
from data.streaming import stream_batches
from experts.objectives import TIMESTEP_SCALE, fm_interpolate
from experts.text_encoder import TextEncoderConfig, load_text_encoder
from router.ensemble import check_compatible
from router.network import build_router, pool_text
from router.presets import ROUTER_PRESETS
from router.sampling import RoutingLog, SamplerConfig, routed_step
from training.loop import TrainConfig, train
from training.router_job import RouterJob

THEMES = {
    "red": ["a red apple", "red strawberry fruit", "a ripe red cherry", "red tomato"],
    "blue": ["the blue ocean", "a blue sky", "deep blue sea water", "blue lake"],
    "green": ["a green forest", "green grass field", "green tree leaves", "a green meadow"],
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


def _make_folder(root, grey: bool = False):
    """40 images per theme in its colour, or (``grey``) all in the same grey noise, so that only the
    captions tell the themes apart."""
    rng = np.random.default_rng(0)
    for theme, caps in THEMES.items():
        for i in range(40):
            mean = np.full(3, 128) if grey else np.array(COLOURS[theme])
            arr = np.clip(mean + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{theme}_{i}.png")
            (root / f"{theme}_{i}.txt").write_text(caps[i % len(caps)])


def test_router_cross_entropy_falls_well_below_log_k(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_folder(src)
    manifest, digest = prepare(
        PrepareConfig(source=f"folder:{src}", out_dir=str(tmp_path / "data"), clusters=3, holdout_fraction=0.0)
    )
    manifest, digest = load_manifest(tmp_path / "data")
    cfg = TrainConfig(ckpt_root=str(tmp_path / "router"), steps=120, batch_size=32, lr=1e-3, log_every=20)
    job = RouterJob(manifest, digest, "pixel", lambda x: x, cfg, "tiny")
    ckpt = train(job, cfg)
    assert ckpt.step == 120

    model = job.model.eval()
    gen = torch.Generator().manual_seed(1)
    losses = []
    with torch.no_grad():
        for batch in stream_batches(manifest, [0, 1, 2], 60, manifest.image_size, epochs=1, shuffle_buffer=0):
            t = torch.rand(len(batch.labels), generator=gen) * 0.9
            x_t = fm_interpolate(batch.images, torch.randn(batch.images.shape, generator=gen), t)
            losses.append(torch.nn.functional.cross_entropy(model(x_t, TIMESTEP_SCALE * t), batch.labels).item())
    assert np.mean(losses) < 0.5 * math.log(3), losses
    assert ckpt.meta["heldout_accuracy"]["t=0.1"] > 0.9


def test_a_router_that_reads_the_prompt_routes_what_the_pixels_cannot(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_folder(src, grey=True)
    prepare(
        PrepareConfig(
            source=f"folder:{src}", out_dir=str(tmp_path / "data"), clusters=3, holdout_fraction=0.0, embed="caption"
        )
    )
    manifest, digest = load_manifest(tmp_path / "data")
    encoder = load_text_encoder(TextEncoderConfig())
    cfg = TrainConfig(ckpt_root=str(tmp_path / "router"), steps=120, batch_size=32, lr=1e-3, log_every=40)
    job = RouterJob(manifest, digest, "pixel", lambda x: x, cfg, "tiny-text", encoder)
    accuracy = train(job, cfg).meta["heldout_accuracy"]
    assert job.meta()["text_encoder"] == encoder.name
    # The pixels are the same noise in every cluster (a router of x_t alone is at chance, 1/3);
    # the router that reads the caption is right even at t = 0.9.
    assert accuracy["t=0.1"] > 0.9 and accuracy["t=0.9"] > 0.9, accuracy
    # Its checkpoints cannot be resumed as another preset's: one clear error, nothing touched.
    plain = RouterJob(manifest, digest, "pixel", lambda x: x, replace(cfg, steps=130), "tiny")
    with pytest.raises(CheckpointError, match="router of preset 'tiny-text', this job's is 'tiny'"):
        train(plain, replace(cfg, steps=130))

    # The sampler hands the router the prompts (the cond rows), so routing follows the caption.
    router = job.model.eval()
    prompts = [THEMES[theme][0] for theme in THEMES]
    states, mask = (torch.cat(p) for p in zip(encoder.encode(prompts), encoder.encode([""] * 3), strict=True))
    expected = []
    for batch in stream_batches(manifest, [0, 1, 2], 120, manifest.image_size, epochs=1, shuffle_buffer=0):
        for p in prompts:
            expected.append(int(batch.labels[batch.captions.index(p)]))
    log = RoutingLog(3, 1)
    experts = {k: (lambda x_t, *a, **kw: torch.zeros_like(x_t)) for k in range(3)}
    x = torch.randn(3, 3, manifest.image_size, manifest.image_size, generator=torch.Generator().manual_seed(0))
    routed_step(x, 1.0, 0.9, router, experts, states, mask, SamplerConfig("top1", 1), log)
    assert log.weights[0].argmax(-1).tolist() == expected


def test_pool_text_and_a_text_router_s_contract():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); the last token is padding
    assert torch.equal(pool_text(states, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="reads the prompt"):
        build_router(ROUTER_PRESETS["tiny-text"], 4, 3, 32)
    net = build_router(ROUTER_PRESETS["tiny-text"], 4, 3, 32, text_dim=8).eval()
    for block in net.blocks:  # adaLN-Zero: an untrained block ignores its conditioning
        torch.nn.init.normal_(block.modulation[1].weight, std=0.1)
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 500.0)
    with pytest.raises(ValueError, match="pooled text embedding"):
        net(x, t)
    with torch.no_grad():
        a, b = net(x, t, torch.zeros(2, 8)), net(x, t, torch.ones(2, 8))
    assert a.shape == (2, 4) and not torch.allclose(a, b)  # the text moves the logits
    plain = build_router(ROUTER_PRESETS["tiny"], 4, 3, 32, text_dim=8)
    assert not plain.reads_text and plain.config.text_dim == 0  # a plain preset ignores the width


def test_an_ensemble_refuses_a_router_reading_another_encoder():
    experts = {0: {"manifest_sha256": "r", "space": "pixel", "text_encoder": "minilm"}}
    assert check_compatible({"manifest_sha256": "r", "space": "pixel", "text_encoder": None}, experts) == "minilm"
    assert check_compatible({"manifest_sha256": "r", "space": "pixel", "text_encoder": "minilm"}, experts) == "minilm"
    with pytest.raises(CheckpointError, match="reads the prompt through 'clip:ViT-L-14'"):
        check_compatible({"manifest_sha256": "r", "space": "pixel", "text_encoder": "clip:ViT-L-14"}, experts)

"""The router learns cluster labels from (x_t, t): cross-entropy falls well below log K.

The toy set is a real folder source run through ``prepare``: three caption themes with
matching colours, so the clusters found from captions are visible in the pixels.
"""

import math

import numpy as np
import torch
from PIL import Image

from data.manifest import load_manifest
from data.prepare import PrepareConfig, prepare
from data.streaming import stream_batches
from experts.objectives import TIMESTEP_SCALE, fm_interpolate
from training.loop import TrainConfig, train
from training.router_job import RouterJob

THEMES = {
    "red": ["a red apple", "red strawberry fruit", "a ripe red cherry", "red tomato"],
    "blue": ["the blue ocean", "a blue sky", "deep blue sea water", "blue lake"],
    "green": ["a green forest", "green grass field", "green tree leaves", "a green meadow"],
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


def _make_folder(root):
    rng = np.random.default_rng(0)
    for theme, caps in THEMES.items():
        for i in range(40):
            arr = np.clip(np.array(COLOURS[theme]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
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
    job = RouterJob(manifest, digest, "pixel", lambda x: x, cfg)
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

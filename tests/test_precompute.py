"""Computed once at prepare time, not at every step: caption token states and (for latent presets)
the VAE posterior of every image are stored in the shards, and training reads them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data.manifest import ManifestError, load_manifest
from data.prepare import PrepareConfig, prepare
from data.streaming import _array, stream_batches
from experts.latent_space import VaeSpace, pil_to_tensor
from experts.text_encoder import TextEncoderConfig, load_text_encoder
from tests.conftest import node
from training.jobs import build_job
from training.loop import TrainConfig, train


def small_vae(folder: Path) -> Path:
    """A random-weight AutoencoderKL with sd-vae's structure (4 blocks: 8x down, 4 latent channels), narrow."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
    )
    vae.save_pretrained(folder)
    return folder


def members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_text_states_are_stored_and_equal_the_encoder(small_run: Path) -> None:
    manifest, _ = load_manifest(small_run / "data")
    assert manifest.text_states == {"encoder": "minilm", "tokens": 16, "dim": 384}
    assert any(n.endswith(".states.npy") for n in members(Path(manifest.shard_urls(0)[0])))
    batch = next(stream_batches(manifest, [0], 16, manifest.image_size, shuffle_buffer=0))
    states, mask = load_text_encoder(TextEncoderConfig()).encode(batch.captions)
    assert torch.equal(batch.mask, mask)
    real = mask.bool()
    torch.testing.assert_close(batch.states[real], states[real], atol=2e-3, rtol=2e-3)  # stored as float16
    assert not batch.states[~real].any()  # padding is not stored: zeros, masked


def test_an_expert_trains_on_stored_states_without_running_the_encoder(small_run: Path, tmp_path: Path) -> None:
    manifest, digest = load_manifest(small_run / "data")
    cfg = TrainConfig(ckpt_root=str(tmp_path), steps=2, batch_size=8, ckpt_every_steps=10**6)
    job = build_job(manifest, digest, "expert_1", cfg)
    assert job.captions.stored

    def refuse(*_a, **_k):
        raise AssertionError("the text encoder ran during training")

    job.encoder.encode = refuse
    assert train(job, cfg).step == 2


def test_latent_preset_stores_the_vae_posterior_and_trains_without_the_vae(tmp_path: Path) -> None:
    vae_dir = small_vae(tmp_path / "vae")
    data = tmp_path / "data"
    manifest, digest = prepare(PrepareConfig(out_dir=str(data), clusters=2, preset="B/2", vae=str(vae_dir), limit=24))
    assert manifest.latents["shape"] == [4, 32, 32] and manifest.latents["vae"] == "vae:vae"
    space = VaeSpace(str(vae_dir))
    assert manifest.latents["scale"] == space.scale
    # The stored posterior is the VAE's own, up to float16.
    shard = Path(manifest.shard_urls(0)[0])
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        key = next(n for n in names if n.endswith(".latent.npy"))[: -len(".latent.npy")]
        stored = np.load(io.BytesIO(tar.extractfile(f"{key}.latent.npy").read()), allow_pickle=False)
        png = tar.extractfile(f"{key}.png").read()
    from PIL import Image

    image = pil_to_tensor(Image.open(io.BytesIO(png)), 256)[None]
    expected = space.posterior(image)[0].numpy()
    assert stored.dtype == np.float16 and stored.shape == (2, 4, 32, 32)
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3, rtol=2e-2)
    # Training needs no --vae: the latents are in the shards.
    cfg = TrainConfig(ckpt_root=str(tmp_path / "ckpt"), steps=1, batch_size=2, ckpt_every_steps=10**6)
    job = build_job(manifest, digest, "expert_0", cfg, vae="")
    job.encode_space = None  # would fail if the loop touched the images' space
    ck = train(job, cfg)
    assert ck.step == 1 and ck.meta["space"] == "vae:vae" and np.isfinite(ck.meta["loss"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "B/2", "--vae", "/nope"], "VAE folder not found at '/nope'"),
        (["--preset", "B/2"], "pass --vae PATH"),
        (["--vae", "SELF"], "works in pixel space"),
        (["--preset", "B/2", "--vae", "SELF"], "not a usable AutoencoderKL folder"),
    ],
)
def test_a_missing_or_unusable_vae_ends_prepare_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path) if a == "SELF" else a for a in args]  # an existing folder that holds no VAE
    proc = node("--role", "prepare", "--workdir", str(tmp_path / "w"), "--limit", "8", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-1500:]
    assert not (tmp_path / "w" / "data" / "manifest.json").exists()


def test_stored_arrays_are_checked_never_unpickled() -> None:
    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()

    good = {"__key__": "k", "states.npy": npy(np.zeros((3, 384), np.float16))}
    assert _array(good, "states.npy", (None, 384)).shape == (3, 384)
    for bad in (
        npy(np.zeros((3, 384), np.float32)),  # wrong dtype
        npy(np.zeros((3, 12), np.float16)),  # wrong width
        npy(np.full((3, 384), np.inf, np.float16)),  # not finite
        npy(np.array([{"a": 1}], dtype=object)),  # a pickle inside: refused, not loaded
        b"not an array",
    ):
        with pytest.raises(ManifestError):
            _array({"__key__": "k", "states.npy": bad}, "states.npy", (None, 384))
    with pytest.raises(ManifestError, match="lacks states.npy"):
        _array({"__key__": "k"}, "states.npy", (None, 384))


def test_manifest_refuses_malformed_precompute_entries(small_run: Path, tmp_path: Path) -> None:
    d = json.loads((small_run / "data" / "manifest.json").read_text())
    for field, value in (("text_states", {"encoder": "minilm", "tokens": -1, "dim": 384}), ("latents", {"vae": 3})):
        (tmp_path / "manifest.json").write_text(json.dumps(d | {field: value}))
        with pytest.raises(ManifestError, match=f"malformed {field}"):
            load_manifest(tmp_path)

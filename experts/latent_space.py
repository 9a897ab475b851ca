"""The space experts denoise in: RGB pixels in [-1, 1] (default) or ``AutoencoderKL`` latents.

A VAE is only used when its weights are on disk (``--vae PATH``, a diffusers folder such as
sd-vae-ft-mse); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class LatentSpace:
    """Pixel space: identity. Subclassed by :class:`VaeSpace` for latents."""

    name = "pixel"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → what the experts denoise."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What the experts produce → (B, 3, H, W) in [-1, 1]."""
        return x.clamp(-1, 1)

    def to(self, device: torch.device | str) -> LatentSpace:
        """Where the space's own network (if any) runs; it takes and gives tensors on any device."""
        return self


def sample_posterior(
    params: torch.Tensor, scale: float, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled latents z = (mean + std * eps) * scale from stored posterior parameters (B, 2, C, h, w).

    Sampling (rather than keeping the mean) at every step is what training through the VAE does:
    it keeps the VAE's own noise as augmentation, and costs one randn."""
    mean, std = params.float().unbind(1)
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator)
    eps = eps.to(mean.device)
    return (mean + std * eps) * scale


class VaeSpace(LatentSpace):
    """diffusers ``AutoencoderKL`` latents, scaled by the VAE's own scaling factor."""

    def __init__(self, path: str, vae: torch.nn.Module | None = None) -> None:
        from diffusers import AutoencoderKL

        if vae is None:
            if not Path(path).is_dir():
                raise ValueError(f"VAE folder not found at {path!r}")
            try:
                vae = AutoencoderKL.from_pretrained(path)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"--vae {path}: not a usable AutoencoderKL folder ({first[:200]})") from None
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self.name = f"vae:{Path(path).name}"

    def to(self, device: torch.device | str) -> VaeSpace:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> torch.Tensor:
        """The latent posterior's (mean, std) per image, unscaled: (B, 2, C, h, w), on the images' device."""
        here = next(self.vae.parameters()).device
        dist = self.vae.encode(images.to(here)).latent_dist
        return torch.stack([dist.mean, dist.std], dim=1).to(images.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents on the images' device, whichever device the VAE is on."""
        here = next(self.vae.parameters()).device
        return (self.vae.encode(images.to(here)).latent_dist.sample() * self.scale).to(images.device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        here = next(self.vae.parameters()).device
        return self.vae.decode(x.to(here) / self.scale).sample.clamp(-1, 1).to(x.device)


def load_space(vae_path: str = "") -> LatentSpace:
    return VaeSpace(vae_path) if vae_path else LatentSpace()


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB(A) image → (3, size, size) in [-1, 1]; transparency is composited on white."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC if size > min(img.size) else Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → RGB image."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")

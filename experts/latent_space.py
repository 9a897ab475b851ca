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


class VaeSpace(LatentSpace):
    """diffusers ``AutoencoderKL`` latents, scaled by the VAE's own scaling factor."""

    def __init__(self, path: str, vae: torch.nn.Module | None = None) -> None:
        from diffusers import AutoencoderKL

        if vae is None:
            if not Path(path).is_dir():
                raise ValueError(f"VAE folder not found at {path!r}")
            vae = AutoencoderKL.from_pretrained(path)
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self.name = f"vae:{Path(path).name}"

    def to(self, device: torch.device | str) -> VaeSpace:
        self.vae.to(device)
        return self

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

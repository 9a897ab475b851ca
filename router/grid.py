"""Writing sampled images as PNGs: one image upscaled, or a captioned grid for several prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from data.fonts import label_font
from experts.latent_space import tensor_to_pil


def save_images(images: torch.Tensor, prompts: list[str], path: Path, cell: int = 128) -> Path:
    """(B, 3, H, W) in [-1, 1] → a PNG; nearest-neighbour upscaling keeps small samples honest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tiles = [tensor_to_pil(x).resize((cell, cell), Image.Resampling.NEAREST) for x in images]
    if len(tiles) == 1:
        tiles[0].save(path)
        return path
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    label = 16
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, prompt) in enumerate(zip(tiles, prompts, strict=False)):
        x, y = (i % cols) * cell, (i // cols) * (cell + label)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + cell + 2), prompt[: cell // 6], fill="black", font=label_font())
    sheet.save(path)
    return path

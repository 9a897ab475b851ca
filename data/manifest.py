"""``manifest.json``: what ``prepare`` produced. Its sha256 names the run.

Per cluster: shard entries (relative path or URL, sha256, sample count), held-out shards,
sample count, centroid in the embedding space, example captions, and the objective and preset
the cluster's expert is trained with. Validated on load: peers will hand these to each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experts.objectives import OBJECTIVES
from experts.presets import EXPERT_PRESETS

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent."""


@dataclass
class ShardEntry:
    url: str  # relative to the manifest's folder, an absolute path, or a URL webdataset opens
    sha256: str
    samples: int


@dataclass
class ClusterEntry:
    id: int
    samples: int
    shards: list[ShardEntry]
    holdout: list[ShardEntry]
    centroid: list[float]
    examples: list[str]
    objective: str = "fm"
    preset: str = "tiny"


@dataclass
class Manifest:
    source: str
    image_size: int
    text_encoder: str  # name of the encoder the captions were embedded with
    embedding: str  # what was clustered: "caption:<encoder>" or "image:<arch>"
    holdout_fraction: float
    clusters: list[ClusterEntry]
    credit: str = ""
    # Computed once at prepare time and stored in the shards beside each image (None: not stored):
    # latents = {"vae": space name, "scale": the VAE's scaling factor, "shape": [C, h, w]}: each
    #   sample's ``latent.npy`` holds the posterior's mean and std, (2, C, h, w) float16;
    # text_states = {"encoder": name, "tokens": L, "dim": D}: each sample's ``states.npy`` holds
    #   its caption's n <= L real token states, (n, D) float16 (padding is masked, so not stored).
    latents: dict | None = None
    text_states: dict | None = None
    version: int = MANIFEST_VERSION
    root: Path | None = field(default=None, compare=False)  # folder it was loaded from; not saved

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    def save(self, folder: Path) -> str:
        """Write ``manifest.json`` into ``folder``; returns its sha256 (the run id)."""
        text = self.to_json()
        (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")
        self.root = folder
        return hashlib.sha256(text.encode()).hexdigest()

    def resolve(self, url: str) -> str:
        """A shard entry's URL as webdataset should open it."""
        if "://" in url or url.startswith("pipe:") or Path(url).is_absolute() or self.root is None:
            return url
        return str(self.root / url)

    def shard_urls(self, cluster: int, holdout: bool = False) -> list[str]:
        entries = self.clusters[cluster].holdout if holdout else self.clusters[cluster].shards
        return [self.resolve(s.url) for s in entries]

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> Manifest:
        try:
            clusters = [
                ClusterEntry(
                    **{
                        **c,
                        "shards": [ShardEntry(**s) for s in c["shards"]],
                        "holdout": [ShardEntry(**s) for s in c.get("holdout", [])],
                    }
                )
                for c in d["clusters"]
            ]
            m = cls(**{**d, "clusters": clusters}, root=root)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None
        m.validate()
        return m

    def validate(self) -> None:
        if self.version != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {self.version} is not supported (expected {MANIFEST_VERSION})")
        if len(self.clusters) < 2:
            raise ManifestError(f"manifest has {len(self.clusters)} clusters; need at least 2")
        for i, c in enumerate(self.clusters):
            if c.id != i:
                raise ManifestError(f"cluster ids must be 0..K-1 in order; got {c.id} at {i}")
            if c.objective not in OBJECTIVES:
                raise ManifestError(f"cluster {i}: unknown objective {c.objective!r}")
            if c.preset not in EXPERT_PRESETS:
                raise ManifestError(f"cluster {i}: unknown preset {c.preset!r}")
            if not c.shards or c.samples <= 0:
                raise ManifestError(f"cluster {i} has no training samples")
            for s in c.shards + c.holdout:
                if len(s.sha256) != 64 or s.samples < 0:
                    raise ManifestError(f"cluster {i}: bad shard entry {s.url!r}")
        lat, txt = self.latents, self.text_states
        if lat is not None and not (
            isinstance(lat.get("vae"), str)
            and isinstance(lat.get("scale"), int | float)
            and isinstance(lat.get("shape"), list)
            and len(lat["shape"]) == 3
            and all(isinstance(n, int) and 0 < n <= 4096 for n in lat["shape"])
        ):
            raise ManifestError(f"malformed latents entry {lat!r}")
        if txt is not None and not (
            isinstance(txt.get("encoder"), str)
            and all(isinstance(txt.get(k), int) and 0 < txt[k] <= 8192 for k in ("tokens", "dim"))
        ):
            raise ManifestError(f"malformed text_states entry {txt!r}")


def load_manifest(path: str | Path) -> tuple[Manifest, str]:
    """Load and validate a manifest (a file or the folder holding it); returns it and its sha256."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise ManifestError(f"no manifest at {p} (run `python node.py --role prepare` first)")
    raw = p.read_bytes()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {p} is not valid JSON: {e}") from None
    return Manifest.from_dict(d, root=p.parent), hashlib.sha256(raw).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

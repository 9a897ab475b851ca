"""Router presets by name: a table the command line reads without importing torch or diffusers."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RouterPreset:
    name: str
    hidden: int
    layers: int
    heads: int
    patch: int
    batch_size: int
    lr: float
    warmup_steps: int = 0  # linear LR warm-up
    text: bool = False  # the router also reads the prompt's pooled text embedding
    # The fraction of captions replaced by the empty prompt in training: half the time the router
    # has only x_t to go by, so it keeps learning the pixels instead of leaning on the text alone
    # (which it memorises: a text router's training loss falls to ~0.07 on the embedded default).
    text_dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# The router a run trains unless told otherwise: the one that reads the prompt. On the embedded
# default it costs +0.3 FID against the oracle at 8x the demo's budget where the one that reads only
# x_t (tiny, Paris's router) costs +25.9 (results/2026-12-01-budgets-1x-8x.md).
DEFAULT_ROUTER_PRESET = "tiny-text"

ROUTER_PRESETS: dict[str, RouterPreset] = {
    p.name: p
    for p in (
        RouterPreset("tiny", 128, 4, 4, 4, batch_size=128, lr=1e-3),
        RouterPreset("tiny-text", 128, 4, 4, 4, batch_size=128, lr=1e-3, text=True, text_dropout=0.5),
        RouterPreset("B/2", 768, 12, 12, 2, batch_size=64, lr=1e-4),
        RouterPreset("B/2-text", 768, 12, 12, 2, batch_size=64, lr=1e-4, text=True, text_dropout=0.5),
    )
}
